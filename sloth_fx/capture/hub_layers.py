"""Hub-kernel layers seen as the modules they replace.

Hugging Face's ``kernels`` package (``kernelize``, or ``from_pretrained(..., use_kernels=True)``)
swaps the forward of a marked module (an RMSNorm, an MLP, a rotary function) for a kernel's,
per instance: it sets the instance's ``forward`` and records the kernel's repository as
``_kernel_repo`` in the instance's ``__dict__``. A function marked so (``use_kernelized_func``)
lives as a module in its user's ``_kernel_funcs``. Dynamo would trace the kernel's op, which no
pattern knows, and sloth_fx would fuse nothing there. While a region's captured forward runs,
:func:`hub_kernels_set_aside` takes those instance forwards away, so that the class's forward, the
computation the kernel stands in for, is what Dynamo captures and sloth_fx rewrites; they are put
back after the call, so the model run outside sloth_fx (evaluation, generation) keeps its
kernels. The fused op then computes what the module's own forward computes. A region's own module
with a hub kernel (a final norm) is gated like any other; outside training its gate runs the
kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_REPO = "_kernel_repo"  # set by kernels on an instance whose forward it replaced
_FUNCS = "_kernel_funcs"  # a module's private kernel-function modules (use_kernelized_func)


def is_hub_kernel(forward_owner: nn.Module) -> bool:
    """``forward_owner``'s instance forward is a hub kernel's (it is the module it replaced)."""
    return _REPO in vars(forward_owner)


def hub_kernel_modules(root: nn.Module, apart: nn.Module | None = None) -> list[nn.Module]:
    """The modules inside ``root`` that could carry a hub kernel: its submodules (not ``root``,
    whose gate runs its kernel itself outside training, nor those of ``apart``, a region of its
    own) and the function modules they keep for ``use_kernelized_func``."""
    skipped = {id(m) for m in apart.modules()} if apart is not None else set()
    out = []
    for module in root.modules():
        if id(module) in skipped:
            continue
        if module is not root:
            out.append(module)
        out += [f for f in vars(module).get(_FUNCS, {}).values() if isinstance(f, nn.Module)]
    return out


@contextlib.contextmanager
def hub_kernels_set_aside(modules: list[nn.Module]) -> Iterator[None]:
    """The hub kernels' instance forwards of ``modules`` taken away while this lasts."""
    taken = [(m, vars(m).pop("forward")) for m in modules if _REPO in vars(m) and "forward" in vars(m)]
    try:
        yield
    finally:
        for module, forward in taken:
            vars(module)["forward"] = forward
