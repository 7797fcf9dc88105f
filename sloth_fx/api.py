"""The public surface: ``optimize``, ``explain`` and ``report``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sloth_fx.capture.regions import RegionGate
from sloth_fx.capture.install import Installation, displaced, install, uninstall
from sloth_fx.kernels.toolkit import SUPPORTED_DTYPES
from sloth_fx.rewrite.pass_manager import available_passes, get_pass
from sloth_fx.report import Report

_ATTR = "_sloth_fx"


def optimize(model: nn.Module, passes: Sequence[str] | None = None, verify: bool = False,
             padding_free: bool = True, memory_budget: int | None = None) -> nn.Module:
    """Prepare ``model`` (a HF causal LM, with or without PEFT) to train through fused ops.

    Nothing is traced yet: each region is captured at its first training forward, rewritten by
    ``passes`` (default: every available pass, in order) and run from then on. With ``verify``,
    each pass's rewrite of each captured graph is checked against the original on random inputs
    (outputs and gradients) and dropped, with a note in the report, if it is further from a
    float64 run than the original is. With ``padding_free`` (the default) a padded training batch
    runs as one packed row, with no FLOPs on padding and the padded run's loss and gradients, and a
    packed row (``position_ids`` restarting) runs attention per sequence without a [T×T] mask;
    ``explain`` says when it applied and why not. Under activation checkpointing, each training
    step is judged against ``memory_budget`` (bytes; None: what the GPU can still hand out, and
    none on CPU): a step whose activations take at most half of it keeps them and recomputes
    nothing; a longer one recomputes as little as the budget allows (layers that keep their
    products' outputs for the recompute, then layers kept whole: :mod:`sloth_fx.memory.saved_products`);
    one whose predicted memory is over it keeps its checkpointed layers' inputs in host memory until
    their recompute (:mod:`sloth_fx.memory.budget`, :mod:`sloth_fx.memory.offload`); in every case
    with the loss and gradients of plain checkpointing, bit for bit. ``explain`` gives the
    latest decision and the prediction. Calling it again replaces the earlier set-up. Returns
    ``model`` itself; its sloth_fx state lives on it (copied by ``deepcopy``, saved by pickling). A
    model already wrapped in ``DistributedDataParallel`` is optimized inside the wrapper (state on
    ``model.module``); an FSDP2 ``fully_shard`` model is the model itself, before or after sharding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    given = model
    if isinstance(model, DistributedDataParallel):  # its forward calls the wrapped model's: the regions are there
        model = model.module
    names = list(passes) if passes is not None else available_passes()
    for name in names:
        get_pass(name)
    _check_parameters(model)
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 0):
        raise ValueError(f"memory_budget must be a number of bytes (an int >= 0) or None, got {memory_budget!r}")
    previous = getattr(model, _ATTR, None)
    if isinstance(previous, Installation):
        uninstall(previous)
    setattr(model, _ATTR, install(model, names, verify, padding_free, memory_budget))
    return given


def report(model: nn.Module) -> Report:
    """The structured report of what ``optimize`` did to ``model`` (or to the model it came from,
    for a module of it, or what ``merge_and_unload`` returned)."""
    installation = getattr(model, _ATTR, None)
    if isinstance(installation, Installation):
        return installation.report
    for module in model.modules() if isinstance(model, nn.Module) else ():
        gate = module.__dict__.get("forward")
        if isinstance(gate, RegionGate):
            return gate.runtime.owner
    raise ValueError("this model has not been through sloth_fx.optimize")


def explain(model: nn.Module) -> str:
    """A readable account of the capture regions, the rewrites, the refusals and why."""
    installation = getattr(model, _ATTR, None)
    return report(model).render(displaced(installation) if isinstance(installation, Installation) else ())


def _check_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name} is {p.dtype}; sloth_fx supports float32, float16 and bfloat16 models")
        if p.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device (it has no values yet): load or materialise "
                             "the weights before sloth_fx.optimize")
        if p.device.type not in ("cuda", "cpu"):
            raise ValueError(f"parameter {name} is on {p.device}; sloth_fx runs on CUDA (and on CPU through references)")
