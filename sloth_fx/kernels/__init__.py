"""Fused Triton ops, each with a hand-derived backward and a plain-PyTorch reference."""

# The op itself stays sloth_fx.kernels.routed_experts.routed_experts: a package attribute of that
# name would hide the submodule from ``import sloth_fx.kernels.routed_experts as m`` and from patching.
from .routed_experts import ExpertProjection, routed_experts_reference, routed_experts_supports

__all__ = ["ExpertProjection", "routed_experts_reference", "routed_experts_supports"]
