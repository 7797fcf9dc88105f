"""Capture: TorchDynamo hands each region's forward to our backend as a torch.fx graph.

transformers v5 has no fx tracer of its own and ``torch.fx.symbolic_trace`` cannot follow its
control flow; Dynamo can. sloth_fx compiles *regions*, not the whole model:

- the decoder layers, grouped by class: Dynamo lifts parameters to graph inputs, so under
  activation checkpointing one capture serves every layer of a class; without it HF hands each
  layer the cache object and Dynamo guards on the layer's entry in it, so each layer is captured
  once;
- the decoder's other parametrised children (the final norm);
- the head and loss: the causal-LM module's forward, with the decoder call made opaque
  (``torch._dynamo.disable``), so the graph after that break is ``lm_head`` + loss.

The backend runs the passes and returns the rewritten ``GraphModule``, which runs eagerly, so
autograd runs each fused op's own backward. Regions run compiled only when the module is training
and grad is enabled; evaluation, ``torch.no_grad()`` and ``generate()`` take the original eager
forward. Batch and sequence sizes are marked dynamic before the first capture, so new sizes never
recapture; a size of 1 causes one more capture (Dynamo specialises sizes 0 and 1).

Dynamo keeps its state (cache entries, guards, recompile counts, which floats and sizes it saw
change) on code objects, for the whole process, and a class's forward is one code object for every
model of the class (transformers' ``forward_with_checkpointing`` is one for every layer class). So
each region of each ``optimize`` call compiles its own copy of the forward (:mod:`sloth_fx.isolation`):
a second model, a ``deepcopy`` or a reloaded pickle never sees another's captures, its eps and
scales stay the constants they are, and each has its own recompile budget, raised only inside its
own calls. All of sloth_fx's state lives in the gate objects installed as the modules' ``forward``
(picklable, copied with the model; a copy compiles afresh).
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sloth_fx.checkpoint import replay_rng_in_checkpoints
from sloth_fx.isolation import isolated
from sloth_fx.memory_budget import plan_offload
from sloth_fx.offload import offloading
from sloth_fx.packed_attention import install_packed_attention, uninstall_packed_attention
from sloth_fx.padding_free import plan
from sloth_fx.pass_manager import run_pass, subgraphs
from sloth_fx.report import Capture, RegionReport, Report
from sloth_fx.verify import compare, concrete


@dataclass
class _Run:
    """The captures that ran for one call of a gate (several where a graph break splits the forward)."""

    captures: list[int]


_RUNNING: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("sloth_fx_running", default=None)
_LIMITS = [name for name in ("recompile_limit", "accumulated_recompile_limit") if hasattr(torch._dynamo.config, name)]


@dataclass
class Region:
    """Modules whose forwards are captured together (one graph serves them all)."""

    name: str
    modules: list[tuple[str, nn.Module]]


def find_regions(model: nn.Module) -> tuple[list[Region], nn.Module | None, nn.Module | None]:
    """The decoder-layer groups, the decoder's other parametrised children, and the head module.

    Returns ``(regions, decoder, head)``; ``head`` is the causal-LM module whose forward holds the
    lm_head and the loss (``None`` when the model has no output embeddings).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        return [], None, None
    prefix = _prefix_of(model, decoder)
    regions: list[Region] = []
    for name, child in decoder.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            by_class: dict[type, list[tuple[str, nn.Module]]] = {}
            for i, layer in enumerate(child):
                by_class.setdefault(type(layer), []).append((f"{path}.{i}", layer))
            regions += [Region(cls.__name__, mods) for cls, mods in by_class.items()]
        elif not isinstance(child, nn.Embedding) and any(True for _ in child.parameters(recurse=False)):
            regions.append(Region(type(child).__name__, [(path, child)]))
    has_head = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    head = base if has_head else None
    if head is not None:
        regions.append(Region(f"{type(base).__name__} head+loss", [(_prefix_of(model, base).rstrip("."), base)]))
    return regions, decoder, head


class Backend:
    """The Dynamo backend of one region: passes over each captured graph, optional verification.

    Every checkpointed body first gets RNG replay (:mod:`sloth_fx.checkpoint`), so that both the
    rewrite and its verification see the recompute draw the forward's random numbers.
    """

    def __init__(self, passes: Sequence[str], verify: bool, region: RegionReport) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.region = region

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        capture = Capture(nodes=len(gm.graph.nodes), dynamic=any(isinstance(x, torch.SymInt) for x in example_inputs))
        self.region.captures.append(capture)
        replayed = sum(replay_rng_in_checkpoints(g) for _, g in subgraphs(gm))
        if replayed:
            capture.notes.append(f"{replayed} activation checkpoint(s) replay the forward's RNG in the recompute")
        check = self.verify and concrete(example_inputs)
        for name in self.passes:
            before = copy.deepcopy(gm) if check else None
            log = run_pass(gm, name)
            capture.logs.append(log)
            if before is None or not log.rewrites:
                continue
            verdict = compare(gm, before, example_inputs)
            if not verdict.ok:
                capture.dropped.append(f"{name}: {verdict.detail}")
                capture.logs.pop()
                gm = before
        if self.verify:
            capture.verified = "each pass checked on random inputs" if check else "skipped: example inputs were fake"
        return CaptureRunner(gm, self.region, len(self.region.captures) - 1)


class CaptureRunner:
    """Runs one rewritten graph and records, for the report, which module ran it."""

    def __init__(self, gm: fx.GraphModule, region: RegionReport, index: int) -> None:
        self.gm, self.region, self.index = gm, region, index

    def __call__(self, *args: Any) -> Any:
        run = _RUNNING.get()
        if run is not None:
            run.captures.append(self.index)
        return self.gm(*args)


class RegionRuntime:
    """One region of one ``optimize`` call: its report, its passes and its own compiled entry."""

    def __init__(self, name: str, report: RegionReport, owner: Report, passes: Sequence[str], verify: bool) -> None:
        self.name, self.report, self.owner, self.passes, self.verify = name, report, owner, list(passes), verify
        self._entry: Callable[..., Any] | None = None
        self._backend: Backend | None = None

    def compile(self, module: nn.Module) -> Callable[..., Any]:
        """``module``'s training forward through the region's private copy of the forward and its one
        backend (made at first use, and afresh after a copy): one capture can serve every module."""
        if self._entry is None:
            self._entry = isolated(type(module).forward, self.name)
            self._backend = Backend(self.passes, self.verify, self.report)
        return torch.compile(self._entry.__get__(module), backend=self._backend)

    def dynamo_config(self) -> dict[str, Any]:
        """Dynamo's settings while the region runs: room for every module's captures (one per layer
        without checkpointing, sizes of 1 twice that), and no DDPOptimizer. Inside a DDP forward
        Dynamo would split the region's graph at DDP's bucket boundaries (the first bucket holds
        1 MiB: a real layer's adapters split it), cutting patterns apart. The split buys compiled
        graphs an overlap of all-reduce with backward, which a rewritten graph has anyway: it runs
        eagerly, so DDP's hooks fire as each gradient is made."""
        return {**{name: 4 * len(self.report.modules) + 8 for name in _LIMITS}, "optimize_ddp": False}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_entry": None, "_backend": None}


class RegionGate:
    """Installed as a module's ``forward``: the training forward runs through the region's capture."""

    def __init__(self, module: nn.Module, path: str, runtime: RegionRuntime) -> None:
        self.module, self.path, self.runtime = module, path, runtime
        self._compiled: Callable[..., Any] | None = None

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.eager)

    @property
    def eager(self) -> Callable[..., Any]:
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.eager(*args, **kwargs)
        return self.run(args, kwargs)

    def run(self, args: tuple, kwargs: dict) -> Any:
        """The training forward, through the region's capture; records who ran what."""
        _mark_batch_and_sequence_dynamic(args, kwargs)
        if self._compiled is None:
            self._compiled = self.runtime.compile(self.module)
        run = _Run([])
        token = _RUNNING.set(run)
        try:
            with torch._dynamo.config.patch(self.runtime.dynamo_config()):
                out = self._compiled(*args, **kwargs)
        finally:
            _RUNNING.reset(token)
        self.runtime.report.ran(self.path, run.captures)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}


class HeadGate(RegionGate):
    """The causal-LM module's gate, where a training call is prepared before Dynamo sees it:

    - labels are checked (shape and dtype), so that bad ones raise a clear error, not a fake-tensor one;
    - no KV cache unless the call asks for one (``use_cache=False``): training never reads it, and
      each layer's guard on its own cache entry would capture every layer apart;
    - with ``padding_free``, a padded batch runs as one packed row (:mod:`sloth_fx.padding_free`);
    - under checkpointing, the step offloads its layers' inputs when its predicted activation memory
      is over ``memory_budget`` (:mod:`sloth_fx.memory_budget`).
    """

    def __init__(self, module: nn.Module, path: str, runtime: RegionRuntime, padding_free: bool,
                 memory_budget: int | None) -> None:
        super().__init__(module, path, runtime)
        self.padding_free = padding_free
        self.memory_budget = memory_budget
        self.takes_use_cache = "use_cache" in inspect.signature(self.eager).parameters

    def run(self, args: tuple, kwargs: dict) -> Any:
        _check_labels(args, kwargs)
        if self.takes_use_cache and "use_cache" not in kwargs:
            kwargs = self.without_cache(kwargs)
        if not self.padding_free:
            return self.run_within_budget(args, kwargs)
        packed = plan(kwargs) if not args else "input passed positionally"
        if isinstance(packed, str):
            self.runtime.owner.padding_free_decision(False, packed)
            return self.run_within_budget(args, kwargs)
        self.runtime.owner.padding_free_decision(True, packed.note)
        return packed.restore(self.run_within_budget((), packed.kwargs))

    def run_within_budget(self, args: tuple, kwargs: dict) -> Any:
        """The region's run, offloading the checkpointed layers' inputs if this step's are over budget."""
        decision = plan_offload(self.module, args, kwargs, self.memory_budget)
        self.runtime.owner.offload_decision(decision.offload, decision.text)
        with offloading(decision.offload):
            return super().run(args, kwargs)


    def without_cache(self, kwargs: dict) -> dict:
        """``kwargs`` with ``use_cache=False``, computing what HF's run computes. Where HF would
        build a cache (``config.use_cache``, no checkpointing), it reads no sequence boundaries
        from ``position_ids`` (its packed-row detection needs no cache): a mask with nothing
        masked keeps the row one causal sequence, as it was."""
        out = {**kwargs, "use_cache": False}
        decoder = self.module.get_decoder() if hasattr(self.module, "get_decoder") else None
        caches = getattr(self.module.config, "use_cache", False) and not getattr(decoder, "gradient_checkpointing", False)
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if caches and kwargs.get("position_ids") is not None and kwargs.get("attention_mask") is None \
                and isinstance(tokens, torch.Tensor):
            out["attention_mask"] = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return out


def _check_labels(args: tuple, kwargs: dict) -> None:
    labels = kwargs.get("labels")
    if labels is None:
        return
    tokens = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    expected = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else None
    if expected is None and isinstance(embeds, torch.Tensor):
        expected = tuple(embeds.shape[:-1])
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a tensor of integer token ids, got {_describe(labels)}")
    if expected is not None and tuple(labels.shape) != expected:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs have {expected}: a causal LM "
                         "takes one label per input token (-100 where nothing is predicted)")


class OpaqueDecoder:
    """Installed as the decoder's ``forward``: Dynamo treats the call as opaque (its layers are
    regions of their own) and the head's graph after it sees dynamic batch and sequence sizes."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.decoder).forward.__get__(self.decoder))

    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = type(self.decoder).forward(self.decoder, *args, **kwargs)
        _mark_batch_and_sequence_dynamic(tuple(out.values()) if hasattr(out, "values") else (out,), {})
        return out


@dataclass
class Installation:
    """What ``install`` changed on a model, so that ``uninstall`` restores exactly that."""

    report: Report
    replaced: list[tuple[nn.Module, Any, Any]]  # (module, its instance-level forward before or None, ours)
    packed_attention: nn.Module | None = None  # the model switched to packed attention

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, pickle) compiles afresh: what the original captured does not run in it
        self.__dict__.update(state)
        for region in self.report.regions.values():
            region.forget()


def install(model: nn.Module, passes: Sequence[str], verify: bool, padding_free: bool,
            memory_budget: int | None = None) -> Installation:
    """Route every region's training forward through Dynamo and the sloth_fx backend; with
    ``padding_free``, switch the model to packed attention and pack padded batches; offload
    checkpointed layers' inputs in steps over ``memory_budget`` (None: the free device memory)."""
    report = Report()
    installation = Installation(report, [])
    regions, decoder, head = find_regions(model)
    if not regions:
        report.notes.append(f"{type(model).__name__} has no decoder with layers to capture; nothing to rewrite")
        return installation
    if padding_free and head is not None:
        refused = install_packed_attention(model)
        if refused is None:
            installation.packed_attention = model
        else:
            report.notes.append(f"padding-free off: {refused}")
    for region in regions:
        foreign = {path: _name(module.__dict__["forward"]) for path, module in region.modules if "forward" in module.__dict__}
        report.notes += [f"{path}: its forward was replaced by {name} before optimize; left as it is, unrewritten"
                         + _what_replaced(name) for path, name in foreign.items()]
        modules = [(path, module) for path, module in region.modules if path not in foreign]
        if not modules:
            continue
        region_report = RegionReport(region.name, [path for path, _ in modules])
        report.regions[region.name] = region_report
        runtime = RegionRuntime(region.name, region_report, report, passes, verify)
        for path, module in modules:
            gate = (HeadGate(module, path, runtime, installation.packed_attention is not None, memory_budget)
                    if module is head else RegionGate(module, path, runtime))
            _replace_forward(installation, module, gate)
    if decoder is not None and any(module is head for module, _, _ in installation.replaced):
        _replace_forward(installation, decoder, OpaqueDecoder(decoder))
    return installation


def displaced(installation: Installation) -> list[str]:
    """What replaced a forward that ``install`` put in place (a trainer's own head, say): sloth_fx
    no longer runs there."""
    names = [(module, _name(module.__dict__.get("forward"))) for module, _, ours in installation.replaced
             if module.__dict__.get("forward") is not ours]
    return [f"{type(module).__name__}'s forward was replaced after optimize by {name}; sloth_fx does not run there"
            + _what_replaced(name) for module, name in names]


def uninstall(installation: Installation) -> None:
    """Put back every ``forward`` that ``install`` replaced, as it was."""
    for module, previous, _ in reversed(installation.replaced):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    installation.replaced.clear()
    if installation.packed_attention is not None:
        uninstall_packed_attention(installation.packed_attention)
        installation.packed_attention = None


def _replace_forward(installation: Installation, module: nn.Module, forward: Any) -> None:
    installation.replaced.append((module, module.__dict__.get("forward"), forward))
    module.forward = forward


def _what_replaced(name: str) -> str:
    """What it means where a trainer's own head took the causal-LM forward, and what to do."""
    if "add_fused_lm_head" not in name:
        return ""
    return (" (TRL's chunked head: it computes the loss and TRL's per-token metrics without building the "
            "logits, so sloth_fx's fused cross-entropy does not run; the decoder layers' rewrites do. TRL 1.x "
            "installs it in SFTTrainer and DPOTrainer with no setting to turn it off: for sloth_fx's "
            "fused loss, train with transformers.Trainer or a loop of your own)")


def _name(forward: Any) -> str:
    """Who wrote ``forward``: its code's own name (``functools.wraps`` would lend it the class's)."""
    fn = getattr(forward, "func", getattr(forward, "__func__", forward))  # functools.partial, bound method
    code = getattr(fn, "__code__", None)
    if code is not None:
        return getattr(code, "co_qualname", code.co_name)
    return type(fn).__qualname__


def _mark_batch_and_sequence_dynamic(args: tuple, kwargs: dict) -> None:
    """Capture batch and sequence sizes as symbols from the first call, so that a new size never
    recaptures (only a size of 1 does, once: Dynamo specialises 0 and 1)."""
    for value in (*args, *kwargs.values()):
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)


def _describe(value: Any) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    return ""
