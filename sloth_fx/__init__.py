"""sloth_fx: faster, leaner LoRA/QLoRA finetuning through fx graph rewrites onto fused Triton ops.

    model = sloth_fx.optimize(model)      # before training
    print(sloth_fx.explain(model))        # what was rewritten, refused, and why
"""

from sloth_fx.api import explain, optimize, report
from sloth_fx.capture.experts_4bit import quantize_experts
from sloth_fx.rewrite.pass_manager import available_passes, register_pass

__all__ = ["optimize", "explain", "report", "register_pass", "available_passes", "quantize_experts"]
