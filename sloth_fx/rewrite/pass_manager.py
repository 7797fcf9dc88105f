"""The pass manager: runs registered passes over a captured graph and the graphs nested in it.

A pass is a function ``(gm, log) -> gm`` that rewrites ``gm.graph`` in place and records in ``log``
what it rewrote and what it refused; a :class:`sloth_fx.rewrite.engine.Rewrite` (patterns, a check and a
replacement, with the engine owning the loop) is one. Passes register by name;
``optimize(passes=[...])`` picks them by that name. Canonicalization runs first, always. After
every pass each graph is linted.

Higher-order ops that carry a body graph (activation checkpointing's ``tag_activation_checkpoint``,
``wrap``...) reference it through a ``get_attr`` node; the manager enters those bodies first, so a
rewrite inside a checkpointed layer is made inside the checkpoint and is recomputed with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.fx as fx

from sloth_fx.rewrite.canonicalize import canonicalize
from sloth_fx.report import PassLog

GraphPass = Callable[[fx.GraphModule, PassLog], fx.GraphModule]

PASS_ORDER = ["lora", "rmsnorm", "rope", "gated_mlp", "cross_entropy", "chunked_mlp"]
# Built in, but run only where optimize(passes=[...]) names them (after the passes they build on).
OPT_IN = ["add_rmsnorm"]
_REGISTRY: dict[str, GraphPass] = {}
_BUILTIN_MODULES = {name: f"sloth_fx.passes.{name}" for name in PASS_ORDER + OPT_IN}


def register_pass(name: str, fn: GraphPass | None = None) -> Callable:
    """Register ``fn`` as the pass ``name`` (usable as a decorator). A research pass is one function;
    a new name joins the default order, at its end (the built-in opt-in passes do not)."""

    def add(f: GraphPass) -> GraphPass:
        _REGISTRY[name] = f
        if name not in PASS_ORDER and name not in OPT_IN:
            PASS_ORDER.append(name)
        return f

    return add(fn) if fn is not None else add


def get_pass(name: str) -> GraphPass:
    _load_builtin(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; known passes: {available_passes()}, opt-in: {OPT_IN}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    """The default passes: every one that can run here, in order (the opt-in ones are not)."""
    for name in PASS_ORDER:
        _load_builtin(name)
    return [name for name in PASS_ORDER if name in _REGISTRY]


def _load_builtin(name: str) -> None:
    """Import the built-in pass module that registers ``name``, if there is one."""
    module = _BUILTIN_MODULES.get(name)
    if name in _REGISTRY or module is None:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise


def subgraphs(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """``gm``'s nested body graphs (depth first, innermost first) and then ``gm`` itself."""
    out: list[tuple[str, fx.GraphModule]] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = getattr(gm, node.target, None)
            if isinstance(sub, fx.GraphModule):
                out += [(f"{node.target}/{name}" if name else node.target, g) for name, g in subgraphs(sub)]
    out.append(("", gm))
    return out


def run_pass(gm: fx.GraphModule, name: str) -> PassLog:
    """Run one pass over ``gm`` and every body graph nested in it; lint each graph afterwards."""
    fn = get_pass(name)
    log = PassLog(name)
    for _, graph_module in subgraphs(gm):
        canonicalize(graph_module)
        fn(graph_module, log)
        graph_module.graph.lint()
        graph_module.recompile()
    return log
