"""No silent loss: a decoder layer whose training call ran none of sloth_fx's rewrites is named, with
its cause and what to do, once per region, as a :class:`UnrewrittenLayerWarning`.

A training call of a layer runs unrewritten when

- Dynamo handed it no capture: it skipped the frame, stopped at a graph break it could not resume
  into a capture, or failed (sloth_fx runs Dynamo with ``suppress_errors``, so that such a layer
  runs eagerly, exactly, instead of crashing the step). The graph breaks Dynamo counted during
  the call (``torch._dynamo.utils.counters``) are the cause it gives;
- or the captures it ran hold no rewrite: no pattern matched, every match was refused (the
  refusals are the cause), or a pass failed on the graph and its capture runs as captured.

The training stays exact either way: the layer computes what it computed before ``optimize``. It
is only not faster, which is what the warning says.
"""

from __future__ import annotations

import warnings
from collections import Counter

from torch._dynamo.utils import counters

from sloth_fx.report import Capture

# What a user can do, in every warning: see more, and tell us.
_WHAT_TO_DO = ("sloth_fx.explain(model) lists every layer and its captures; TORCH_LOGS=graph_breaks shows where "
               "Dynamo stopped. If your transformers is newer than sloth_fx's tested releases (README), pin the "
               "newest tested one, and please report it with both versions.")


_LONGEST = 400  # characters of a reason in a warning (Dynamo's graph-break messages run to pages)


class UnrewrittenLayerWarning(UserWarning):
    """A layer trained as it was, without sloth_fx's fused ops: exact, but not faster."""


def graph_breaks() -> Counter[str]:
    """Dynamo's graph-break counts so far (a snapshot, to diff against after a call)."""
    return Counter(counters["graph_break"])


def breaks_since(before: Counter[str]) -> list[str]:
    """The graph-break reasons Dynamo counted since ``before``."""
    return [reason for reason, n in counters["graph_break"].items() if n > before.get(reason, 0)]


def unrewritten_cause(captures: list[Capture], breaks: list[str]) -> str | None:
    """Why a call that ran ``captures`` (with ``breaks`` during it) ran none of sloth_fx's
    rewrites, in a user's words; None when it ran some."""
    if not captures:
        cause = "TorchDynamo did not capture its forward"
        return f"{cause}: {_first(breaks)}" if breaks else f"{cause} (it skipped the frame, or gave up on it)"
    if any(log.rewrites for cap in captures for log in cap.logs):  # per call: not cap.rewrites()'s lists
        return None
    failed = [note for cap in captures for note in cap.notes if note.startswith("a pass failed")]
    if failed:
        return failed[0]
    refusals = [f"{rf.pass_name} refused {rf.location or 'a match'}: {rf.reason}"
                for cap in captures for log in cap.logs for rf in log.refusals]
    dropped = [f"verify dropped {d}" for cap in captures for d in cap.dropped]
    reasons = dropped + refusals
    if reasons:
        return f"every rewrite was refused or dropped: {_first(reasons)}"
    return "no pattern of sloth_fx's passes matched its computation"


def warn_unrewritten(path: str, region: str, layers: int, cause: str) -> None:
    """The warning for a region whose layer ``path`` ran unrewritten."""
    others = f" (and likely the other {layers - 1} layers of its class)" if layers > 1 else ""
    warnings.warn(f"sloth_fx: {path}, a {region}{others}, trains unrewritten, exactly as without sloth_fx but no "
                  f"faster: {cause}. {_WHAT_TO_DO}", UnrewrittenLayerWarning, stacklevel=2)


def _first(reasons: list[str]) -> str:
    """The first reason, cut to a readable length, and how many more there are."""
    first = reasons[0] if len(reasons[0]) <= _LONGEST else reasons[0][:_LONGEST] + "..."
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"{first}{more}"
