"""A private copy of a function, so that TorchDynamo keeps a separate state for it.

Dynamo stores what it learns about a frame on the frame's code object (cache entries, guards,
recompile counts) and under a key of (file, first line, name) (which sizes and floats it saw
change): every model of a class shares them. :func:`isolated` copies ``fn`` with a code object of
a new name, and so does for each function it wraps (decorators such as transformers'
``forward_with_checkpointing`` or ``can_return_tuple`` keep the wrapped function in a closure
cell, named by ``__wrapped__``): a graph break inside the wrapped function, where Dynamo compiles
the inner frame on its own, still lands on a private code object. Behaviour is unchanged: same
bytecode, globals, defaults and closure (but for the copied cell).
"""

from __future__ import annotations

import itertools
import re
import types
from collections.abc import Callable
from typing import Any

_COUNT = itertools.count()


def isolated(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """A copy of ``fn`` (and of the chain of functions it wraps) with code objects of its own."""
    return _copy(fn, "sloth_fx_%d_%s" % (next(_COUNT), re.sub(r"\W+", "_", tag)))


def _copy(fn: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    if not isinstance(fn, types.FunctionType):
        return fn
    wrapped = fn.__dict__.get("__wrapped__")
    inner = _copy(wrapped, suffix) if wrapped is not None else None
    closure = fn.__closure__
    if closure is not None and inner is not None:
        closure = tuple(types.CellType(inner) if _holds(c, wrapped) else c for c in closure)
    code = fn.__code__
    names = {"co_name": f"{code.co_name}__{suffix}"}
    if hasattr(code, "co_qualname"):
        names["co_qualname"] = f"{code.co_qualname}__{suffix}"
    copy = types.FunctionType(code.replace(**names), fn.__globals__, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    if inner is not None:
        copy.__wrapped__ = inner
    return copy


def _holds(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False
