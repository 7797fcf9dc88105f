"""What sloth_fx did to a model: regions captured, rewrites made, rewrites refused and why.

A region (the decoder layers of one class, the final norm, the head and loss) is captured once per
distinct guard set: a first capture, then a few more (sizes of 1, the first layer whose input needs
no grad, one per layer where Dynamo guards on the layer). Each capture records the modules that ran
it; each module runs the capture it ran last, or runs eagerly when Dynamo handed it no capture
(``eager``, with the reason). The counts are of what runs: a rewrite is a site in the model once
for every module whose current capture holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sloth_fx.kernels.lora_forms import FormsRecords


class Explained(Protocol):
    """A record that gives its own line of the report (a region's routed experts)."""

    def line(self) -> str: ...


@dataclass(frozen=True)
class Rewrite:
    pass_name: str
    location: str
    detail: str = ""
    takes_over: str | None = None  # the earlier pass whose fused op at ``location`` this one replaced


@dataclass(frozen=True)
class Refusal:
    pass_name: str
    location: str
    reason: str


@dataclass
class PassLog:
    """What one pass run on one graph recorded."""

    pass_name: str
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rewrite(self, location: str, detail: str = "", takes_over: str | None = None) -> None:
        self.rewrites.append(Rewrite(self.pass_name, location, detail, takes_over))

    def refuse(self, location: str, reason: str) -> None:
        self.refusals.append(Refusal(self.pass_name, location, reason))


@dataclass
class Capture:
    """One graph Dynamo handed to the backend for a region, and who has run it."""

    nodes: int
    dynamic: bool
    logs: list[PassLog] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    verified: str = "not run"
    notes: list[str] = field(default_factory=list)
    modules: dict[str, int] = field(default_factory=dict)  # module path -> calls
    lora_forms: FormsRecords = field(default_factory=dict)  # the forms its fused LoRA groups ran in

    def rewrites(self) -> list[Rewrite]:
        """The rewrites that run: one that a later pass took over (its fused op replaced in turn)
        is left out, so that each fused call in the graph is counted once."""
        running = [rw for log in self.logs for rw in log.rewrites]
        for later in [rw for rw in running if rw.takes_over]:
            earlier = next((rw for rw in running if (rw.pass_name, rw.location) == (later.takes_over, later.location)),
                           None)
            if earlier is not None:
                running.remove(earlier)
        return running


@dataclass
class RegionReport:
    name: str
    modules: list[str]
    captures: list[Capture] = field(default_factory=list)
    current: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module path -> captures of its last call
    eager: dict[str, str] = field(default_factory=dict)  # module path -> why its last call ran no capture

    def ran(self, module: str, captures: list[int], why_none: str | None = None) -> None:
        """One training call of ``module`` ran ``captures`` (none: Dynamo ran it eagerly, unrewritten,
        for the reason ``why_none``)."""
        for index in captures:
            calls = self.captures[index].modules
            calls[module] = calls.get(module, 0) + 1
        self.current[module] = tuple(captures)
        if captures:
            self.eager.pop(module, None)
        else:
            self.eager[module] = why_none or "Dynamo ran no capture for it (a frame it skips, or a guard it cannot meet)"

    def forget(self) -> None:
        """Start over (a copy of the model recaptures everything for itself)."""
        self.captures.clear()
        self.current.clear()
        self.eager.clear()


@dataclass
class Report:
    regions: dict[str, RegionReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    padding_free: dict[str, str] = field(default_factory=dict)  # "applied" / "not applied" -> the latest
    checkpointing: dict[str, str] = field(default_factory=dict)  # keep / recompute / offload / none -> the latest
    experts: list[Explained] = field(default_factory=list)  # each region's routed experts

    def padding_free_decision(self, applied: bool, what: str) -> None:
        """The latest padded-batch decision: a note of what was packed, or the reason not."""
        self.padding_free["applied" if applied else "not applied"] = what

    def checkpointing_decision(self, mode: str, what: str) -> None:
        """The latest step's decision for its checkpointed layers (keep their activations,
        recompute, or offload their inputs), with its predicted activation memory."""
        self.checkpointing[mode] = what

    def sites(self, pass_name: str) -> list[str]:
        """Module paths where ``pass_name``'s rewrites run: each module's current capture's rewrites."""
        out = []
        for region in self.regions.values():
            for module, indices in region.current.items():
                out += [_join(module, rw.location) for i in indices for rw in region.captures[i].rewrites()
                        if rw.pass_name == pass_name]
        return out

    def count(self, pass_name: str) -> int:
        return len(self.sites(pass_name))

    def refusals(self, pass_name: str | None = None) -> list[Refusal]:
        """The refusals in the captures that modules run now."""
        return [
            rf
            for region in self.regions.values()
            for index in sorted({i for indices in region.current.values() for i in indices})
            for log in region.captures[index].logs
            for rf in log.refusals
            if pass_name in (None, rf.pass_name)
        ]

    def render(self, notes: Sequence[str] = ()) -> str:
        """The report as text; ``notes``: facts about the model now, put first."""
        lines = ["sloth_fx report"]
        lines += [f"  note: {n}" for n in (*notes, *self.notes)]
        lines += [f"  padding-free, {k} (latest): {v}" for k, v in self.padding_free.items()]
        lines += [f"  activation checkpointing, {k} (latest): {v}" for k, v in self.checkpointing.items()]
        lines += [f"  {experts.line()}" for experts in self.experts]
        if not any(r.captures or r.eager for r in self.regions.values()):
            lines.append("  nothing captured yet: regions are captured at the first training forward")
        for region in self.regions.values():
            lines.append(_region_header(region))
            for indices, body in _groups(region.captures):
                lines.append(_capture_header(indices, [region.captures[i] for i in indices]))
                lines += body
            for module, reason in region.eager.items():
                lines.append(f"    {module} runs unrewritten: {reason}")
        names = sorted({rw.pass_name for r in self.regions.values() for c in r.captures for rw in c.rewrites()})
        totals = {name: n for name in names if (n := self.count(name))}
        if totals:
            summary = ", ".join(f"{name} {n}" for name, n in totals.items())
            lines.append(f"  rewrite sites running in the model: {summary}")
        elif any(r.captures for r in self.regions.values()):
            lines.append("  no rewrite applied: the model runs as it was")
        return "\n".join(lines)


def _region_header(region: RegionReport) -> str:
    n = len(region.modules)
    where = region.modules[0] if n == 1 else f"{region.modules[0]} .. {region.modules[-1]} ({n} modules)"
    caps = len(region.captures)
    return f"  region {region.name}: {where}; captured {caps} time{'s' if caps != 1 else ''}"


def _groups(captures: list[Capture]) -> list[tuple[list[int], list[str]]]:
    """Captures that did the same (one per layer, say), listed once with all their indices."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, cap in enumerate(captures):
        groups.setdefault(tuple(_capture_body(cap)), []).append(i)
    return [(indices, list(body)) for body, indices in groups.items()]


def _capture_header(indices: list[int], caps: list[Capture]) -> str:
    users = len({m for cap in caps for m in cap.modules})
    calls = sum(n for cap in caps for n in cap.modules.values())
    shapes = "/".join(sorted({"dynamic shapes" if cap.dynamic else "static shapes" for cap in caps}))
    nodes = "/".join(str(n) for n in sorted({cap.nodes for cap in caps}))
    which = f"capture {indices[0]}" if len(indices) == 1 else f"captures {_ranges(indices)}"
    return f"    {which}: {nodes} nodes, {shapes}; run by {users} module{'s' if users != 1 else ''} ({calls} calls)"


def _capture_body(cap: Capture) -> list[str]:
    lines = [f"      verify: {cap.verified}"] if cap.verified != "not run" else []
    lines += [f"      dropped by verify: {d}" for d in cap.dropped]
    lines += [f"      note: {n}" for n in cap.notes]
    for log in cap.logs:
        for rw in log.rewrites:
            detail = f"  ({rw.detail})" if rw.detail else ""
            lines.append(f"      {log.pass_name}: rewrote {rw.location}{detail}")
        for rf in log.refusals:
            lines.append(f"      {log.pass_name}: refused {rf.location}: {rf.reason}")
        lines += [f"      {log.pass_name}: {note}" for note in log.notes]
    return lines


def _ranges(indices: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _join(module: str, location: str) -> str:
    if not location:
        return module
    return f"{module}.{location}" if module else location
