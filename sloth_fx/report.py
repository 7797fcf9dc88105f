"""What sloth_fx did to a model: regions captured, rewrites made, rewrites refused and why.

A region (the decoder layers of one class, the final norm, the head and loss) is captured once per
distinct guard set (a first static capture, then at most a few more, e.g. one with dynamic shapes).
Every layer of a region runs the same rewritten graph, so a rewrite found once in a layer graph is
made at that place in every layer: ``sites`` counts it once per module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rewrite:
    pass_name: str
    location: str
    detail: str = ""


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

    def rewrite(self, location: str, detail: str = "") -> None:
        self.rewrites.append(Rewrite(self.pass_name, location, detail))

    def refuse(self, location: str, reason: str) -> None:
        self.refusals.append(Refusal(self.pass_name, location, reason))


@dataclass
class Capture:
    """One graph Dynamo handed to the backend for a region."""

    nodes: int
    dynamic: bool
    logs: list[PassLog] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    verified: str = "not run"


@dataclass
class RegionReport:
    name: str
    modules: list[str]
    captures: list[Capture] = field(default_factory=list)

    @property
    def latest(self) -> Capture | None:
        return self.captures[-1] if self.captures else None


@dataclass
class Report:
    regions: dict[str, RegionReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def sites(self, pass_name: str) -> list[str]:
        """Module paths rewritten by ``pass_name`` in the latest capture of every region."""
        out = []
        for region in self.regions.values():
            if region.latest is None:
                continue
            for log in region.latest.logs:
                for rw in log.rewrites:
                    if rw.pass_name == pass_name:
                        out += [_join(m, rw.location) for m in region.modules]
        return out

    def count(self, pass_name: str) -> int:
        return len(self.sites(pass_name))

    def refusals(self, pass_name: str | None = None) -> list[Refusal]:
        return [
            rf
            for region in self.regions.values()
            if region.latest is not None
            for log in region.latest.logs
            for rf in log.refusals
            if pass_name in (None, rf.pass_name)
        ]

    def render(self) -> str:
        lines = ["sloth_fx report"]
        lines += [f"  note: {n}" for n in self.notes]
        if not any(r.captures for r in self.regions.values()):
            lines.append("  nothing captured yet: regions are captured at the first training forward")
        totals: Counter[str] = Counter()
        for region in self.regions.values():
            lines.append(_region_header(region))
            cap = region.latest
            if cap is None:
                continue
            lines.append(f"    verify: {cap.verified}")
            lines += [f"    dropped by verify: {d}" for d in cap.dropped]
            for log in cap.logs:
                for rw in log.rewrites:
                    totals[rw.pass_name] += len(region.modules)
                    detail = f"  ({rw.detail})" if rw.detail else ""
                    lines.append(f"    {log.pass_name}: rewrote {rw.location}{detail}")
                for rf in log.refusals:
                    lines.append(f"    {log.pass_name}: refused {rf.location}: {rf.reason}")
                lines += [f"    {log.pass_name}: {note}" for note in log.notes]
        if totals:
            summary = ", ".join(f"{name} {n}" for name, n in sorted(totals.items()))
            lines.append(f"  rewrite sites in the model: {summary}")
        elif any(r.captures for r in self.regions.values()):
            lines.append("  no rewrite applied: the model runs as it was")
        return "\n".join(lines)


def _region_header(region: RegionReport) -> str:
    n = len(region.modules)
    where = region.modules[0] if n == 1 else f"{region.modules[0]} .. {region.modules[-1]} ({n} modules)"
    caps = len(region.captures)
    dyn = " (last with dynamic shapes)" if caps and region.captures[-1].dynamic else ""
    return f"  region {region.name}: {where}; captured {caps} time{'s' if caps != 1 else ''}{dyn}"


def _join(module: str, location: str) -> str:
    if not location:
        return module
    return f"{module}.{location}" if module else location
