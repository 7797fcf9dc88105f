"""The LoRA plan, for ``passes/lora.py``'s report, until it imports it from where it now lives.

The cost model moved next to what it decides: :mod:`sloth_fx.kernels.roofline` (device rates,
the time of a product or a pass) and :mod:`sloth_fx.kernels.lora_plan` (LoRA's forms). Nothing
else of the core uses it; this module goes once ``passes/lora.py`` imports
``sloth_fx.kernels.lora_plan.lora_plan``.
"""

from sloth_fx.kernels.lora_plan import lora_plan

__all__ = ["lora_plan"]
