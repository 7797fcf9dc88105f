"""The rewrite driver: a pass given as patterns, a check and a replacement; the engine runs the loop.

A :class:`Rewrite` is a pass (``rewrite(gm, log)``, registered with ``register_pass``). For each of
its patterns in turn (each sees the graph as the earlier ones left it) the driver finds every
match, asks ``check`` why it must not be rewritten (``None``: it may; the report names the
pattern beside the reason), gathers the accepted matches into groups by ``group`` (each match
alone by default), asks ``check_group`` the same of a group, and calls ``replace`` on it. Every
refusal goes to the report with its reason, at each site it concerns, and nothing of a refused
group is rewritten: a replacement that cannot be placed (``graph_edit.NotSchedulable``) leaves
the graph as it was. ``replace`` returns the sites it rewrote, :class:`Site` s for the report.

``find`` takes the place of the pattern loop where a pass finds its matches in its own way (LoRA
merges several patterns and a matcher for 4-bit bases); it returns the matches, each with the
reason found on the way to it, if any, before ``check``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch.fx as fx

from sloth_fx.rewrite.graph_edit import NotSchedulable, module_path
from sloth_fx.rewrite.patterns import Match, Pattern, find_matches
from sloth_fx.report import PassLog


class Site(NamedTuple):
    """One rewritten site for the report: where (the module path in the region), what was put
    there, a note on how it was decided (the cost model's choice, say), if any, and the earlier
    pass whose fused op there this rewrite replaced, if any (the report then counts this site
    alone, as what runs)."""

    where: str
    what: str
    note: str | None = None
    takes_over: str | None = None


def output_path(match: Match) -> str:
    """Where a match sits: the module its output was traced in."""
    return module_path(match.output)


@dataclass(frozen=True)
class Rewrite:
    """A pass as data: what it matches, why it refuses, what it puts in place."""

    patterns: Sequence[Pattern]
    check: Callable[[Match], str | None]
    replace: Callable[[fx.GraphModule, list[Match]], list[Site]]
    where: Callable[[Match], str] = output_path
    group: Callable[[Match], Hashable] | None = None
    check_group: Callable[[list[Match]], str | None] | None = None
    find: Callable[[fx.GraphModule], Iterable[tuple[Match, str | None]]] | None = None

    def __call__(self, gm: fx.GraphModule, log: PassLog) -> fx.GraphModule:
        for found in self._found(gm):
            accepted = []
            for match, reason in found:
                reason = reason or self.check(match)
                if reason:
                    log.refuse(self.where(match), f"{match.pattern.name}: {reason}")
                else:
                    accepted.append(match)
            for matches in self._groups(accepted):
                self._replace_group(gm, matches, log)
        return gm

    def _found(self, gm: fx.GraphModule) -> Iterable[list[tuple[Match, str | None]]]:
        if self.find is not None:
            yield list(self.find(gm))
            return
        for pattern in self.patterns:
            yield [(match, None) for match in find_matches(gm.graph, pattern)]

    def _groups(self, matches: list[Match]) -> list[list[Match]]:
        if self.group is None:
            return [[match] for match in matches]
        groups: dict[Hashable, list[Match]] = {}
        for match in matches:
            groups.setdefault(self.group(match), []).append(match)
        return list(groups.values())

    def _replace_group(self, gm: fx.GraphModule, matches: list[Match], log: PassLog) -> None:
        reason = self.check_group(matches) if self.check_group is not None else None
        if reason is None:
            try:
                sites = self.replace(gm, matches)
            except NotSchedulable as err:
                reason = str(err)
        if reason is not None:
            for match in matches:
                log.refuse(self.where(match), reason)
            return
        for site in sites:
            log.rewrite(site.where, site.what, site.takes_over)
            if site.note is not None:
                log.notes.append(site.note)
