"""A pass that also names what it left: a :class:`~sloth_fx.rewrite.engine.Rewrite`, then a census.

A rewrite's refusals cover what its patterns matched. A computation of the same kind that
matches no pattern (an interleaved rope, DoRA, a loss over a LoRA'd head) would run as it was with
nothing said. :func:`with_census` runs the rewrite, then asks a *census* (a function of the graph
that recognises the pass's subject in a looser way than its patterns) what of that kind is still
in the graph, and logs each finding as a refusal, with its reason. Nodes that a pattern still
matches after the rewrite belong to matches the rewrite refused, whose reasons are logged
already: the census is told to leave them out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx as fx

from sloth_fx.report import PassLog
from sloth_fx.rewrite.engine import Rewrite
from sloth_fx.rewrite.patterns import Match, find_matches

# A census: (graph, nodes of refused matches) -> (where, reason) for each leftover it finds.
Census = Callable[[fx.Graph, Iterable[fx.Node]], list[tuple[str, str]]]


def with_census(rewrite: Rewrite, census: Census) -> Callable[[fx.GraphModule, PassLog], fx.GraphModule]:
    """The pass ``(gm, log) -> gm``: ``rewrite``, then a refusal for each leftover of ``census``."""

    def run(gm: fx.GraphModule, log: PassLog) -> fx.GraphModule:
        rewrite(gm, log)
        refused = [n for match in _matches(rewrite, gm) for n in match.nodes]
        for where, reason in census(gm.graph, refused):
            log.refuse(where, reason)
        return gm

    return run


def _matches(rewrite: Rewrite, gm: fx.GraphModule) -> list[Match]:
    """What the rewrite matches in ``gm`` now (after it ran: what it refused)."""
    if rewrite.find is not None:
        return [match for match, _ in rewrite.find(gm)]
    return [match for pattern in rewrite.patterns for match in find_matches(gm.graph, pattern)]
