"""Plan the fused dynamic path: per-sample layers without per-sample weights.

With the default dynamic design, sample ``b``'s flat weights are
``g[b, p] = shift_t + scale_t * (s[b, p // C] * G0[p] + bg[p % C])`` where ``G0 = E Wg^T`` is
shared by all samples. For a Linear or Conv layer whose weight row ``o`` (one output channel,
flattened) spans the chunks ``first(o) .. first(o) + S - 1``:

    y_b[o] = sum_j s[b, first(o) + j] * (M_j x_b)[o] + (BG x_b)[o] + bias_b[o]

where ``M_j`` holds ``scale_t * G0`` on the elements of segment ``j`` (zero elsewhere) and
``BG = shift_t + scale_t * bg[p % C]``. ``S + 1`` shared GEMMs/convolutions, then a per-sample
weighted sum: no ``batch x P`` weights are ever built.

The same read along the input axis covers weights stored ``(in, out, ...)`` (ConvTranspose,
transformers' Conv1D): the per-sample scales multiply the layer's input instead. Norm layers
(BatchNorm, LayerNorm, GroupNorm, RMSNorm and transformers' RMSNorms) normalise the whole batch
and apply each sample's own weight and bias (``batch x channels`` values); an Embedding computes
only the entries it looks up; nn.MultiheadAttention fuses its projections. A parameter used
directly in a ``forward`` gets one value per sample where the probe (:func:`probe_batch_flow`)
saw it only broadcast elementwise into batched tensors.

The target runs once on the whole batch with those modules swapped (no ``vmap``, so Python
control flow on values works). Everything else that owns generated tensors, or buffers its
forward writes, falls back to the materialising path for that module only: its own tensors per
sample, ``vmap`` over the batch. Parameter-free modules run on the whole batch, which is what
they would compute sample by sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .layout import Chunking, Layout

__all__ = [
    "BatchFlow",
    "FusedLayer",
    "FusionPlan",
    "plan_torch_fusion",
    "probe_batch_flow",
    "torch_kind",
]

#: Layers whose rows span more chunks than this are materialised instead (the shared GEMM grows
#: with the number of segments; past this point building the layer's weights is cheaper).
MAX_SEGMENTS = 16
NONLINEAR_GENERATOR = "the weight generator has hidden layers (not linear)"
#: Torch modules with a batched form, by exact type (a subclass may override ``forward``):
#: ``torch.nn`` class name -> kind (a forward in ``hypernn_gen/kernel/torch.py``).
FUSIBLE = {
    "Linear": "linear",
    "Conv1d": "conv1d",
    "Conv2d": "conv2d",
    "Conv3d": "conv3d",
    "ConvTranspose1d": "conv_transpose1d",
    "ConvTranspose2d": "conv_transpose2d",
    "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm",
    "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
    "RMSNorm": "rms_norm",
    "Embedding": "embedding",
    "MultiheadAttention": "multihead_attention",
}
#: Library classes with a batched form, matched by identity with the class the library defines
#: (``sys.modules[module].name``, looked up only if the target imported that module): (module,
#: class, kind). ``elementwise``: the weight is used elementwise in ``forward`` (RMSNorm-style;
#: checked numerically when planned); ``transposed_linear``: ``x @ weight + bias`` with a weight
#: ``(in, out)`` (GPT-2's Conv1D; checked numerically too).
LIBRARY_KINDS = (
    ("transformers.pytorch_utils", "Conv1D", "transposed_linear"),
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "elementwise"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "elementwise"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "elementwise"),
    ("transformers.models.t5.modeling_t5", "T5LayerNorm", "elementwise"),
)
#: Kinds computed with shared GEMMs/convolutions (index buffers, ``segments``).
GEMM_KINDS = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "transposed_linear",
    "multihead_attention",
)
#: Kinds whose weight's first axis is the one contracted (the input): the per-sample scales
#: multiply the layer's input instead of its output.
TRANSPOSED_KINDS = ("conv_transpose1d", "conv_transpose2d", "transposed_linear")


@dataclass(frozen=True)
class FusedLayer:
    path: str  #: module path in the target, e.g. ``"0"`` or ``"features.3"``
    kind: str  #: a value of :data:`FUSIBLE`, a library kind, or ``"direct"``
    weight: int | None  #: index of the weight in ``layout.generated`` (``None``: none or kept)
    bias: int | None  #: index of the bias in ``layout.generated`` (``None``: none or kept)
    #: chunks one weight row spans at most (``S``) for GEMM kinds; for ``"direct"`` (a parameter
    #: used directly in the module's forward, ``weight`` its index) the rank of the batched
    #: tensors it is broadcast into; 0 for the other kinds
    segments: int
    #: every input is shared with a leading 1 (position ids ``(1, L)``) and the output is only
    #: broadcast into batched tensors: the inputs are repeated for every sample
    broadcast: bool = False


@dataclass(frozen=True)
class FusionPlan:
    fused: tuple[FusedLayer, ...]
    per_sample: tuple[str, ...]  #: module paths run per sample with materialised weights
    reasons: tuple[tuple[str, str], ...]  #: (module path, why it is not fused)
    #: every module of the target, in order: (path, route, detail); route is ``"fused"``
    #: (detail: the kind), ``"whole batch"`` (owns no generated tensor), ``"per sample"`` (run
    #: alone under vmap; detail: why) or ``"inside"`` (detail: the per-sample module it is in)
    routes: tuple[tuple[str, str, str], ...] = ()
    #: (module path, flags) for each module in ``per_sample``: which tensors of its call
    #: (positional, then keyword, in any container) carry the batch, as the probe saw them
    batched: tuple[tuple[str, tuple[bool, ...]], ...] = ()

    def summary(self) -> str:
        if not self.fused:
            return "no layer fused: every generated tensor is materialised per sample"
        names = ", ".join(dict.fromkeys(f.path or "<root>" for f in self.fused))
        rest = f"; per sample: {', '.join(p or '<root>' for p in self.per_sample)}"
        return f"fused: {names}" + (rest if self.per_sample else "")


def segments(offset: int, rows: int, row: int, chunk: int) -> int:
    """The most chunks one row spans, for rows of length ``row`` starting at ``offset``."""
    worst = 1
    for o in range(rows):
        start = offset + o * row
        worst = max(worst, (start + row - 1) // chunk - start // chunk + 1)
        if worst >= MAX_SEGMENTS + 1:
            break
    return worst


#: Two batch sizes the target is run with on ``meta`` to see which inputs of each module carry
#: the batch first. Odd primes, so that no other dimension is likely to follow both.
PROBE_BATCHES = (3, 5)
#: A real probe (the forward branches on values, so it cannot run on ``meta``) builds the target
#: for real: up to this many parameter and buffer values.
REAL_PROBE_LIMIT = 1 << 26


@dataclass(frozen=True)
class BatchFlow:
    """Where the batch goes inside the target, seen by running it twice (batch sizes
    :data:`PROBE_BATCHES`), on ``meta`` or, where the forward branches on values, for real.

    ``calls[path]`` holds, for every call of the module at ``path``, one flag per tensor input
    (the tensors among the ``pytree`` leaves of ``(args, kwargs)``: positional, then keyword in
    call order, in any container): does its first dimension follow the batch? A module
    that was never called has no entry. ``error`` says why the target could not be run.

    ``uses[name]`` says how a tracked value is used: a parameter by its name, or (``">" + path``)
    the output of a module whose every input is shared with a leading 1 (position ids ``(1, L)``).
    An ``int`` is the rank of the batched tensors it is broadcast into, elementwise (``x +
    pos_embed``, ``logit_scale.exp() * logits``): then one value per sample, shaped to broadcast
    the same way, gives each sample its own result. A ``str`` says why that is not proven.
    ``mutated`` lists the buffers the forward writes in place (BatchNorm statistics).
    """

    calls: dict[str, tuple[tuple[bool, ...], ...]]
    error: str | None = None
    uses: dict[str, int | str] = field(default_factory=dict)
    mutated: frozenset[str] = frozenset()
    real: bool = False  #: probed with real values (the forward branches on them)

    def shared_input(self, path: str) -> bool:
        """Some call of ``path`` got a tensor without the batch first (a shared input)."""
        return any(not all(flags) for flags in self.calls.get(path, ()))

    def flags(self, path: str) -> tuple[bool, ...] | None:
        """The flags of ``path``'s calls if every call has the same ones, else ``None``."""
        calls = set(self.calls.get(path, ()))
        return next(iter(calls)) if len(calls) == 1 else None

    def batched_input(self, path: str) -> bool:
        """Every call of ``path`` got at least one tensor with the batch first."""
        calls = self.calls.get(path, ())
        return bool(calls) and all(any(flags) for flags in calls)

    def broadcast_output(self, path: str) -> bool:
        """Every input of ``path`` is shared with a leading 1 and its output is only broadcast
        elementwise into batched tensors: run on its inputs repeated per sample, it gives each
        sample its own row of what the target computes."""
        return isinstance(self.uses.get(">" + path), int)


def _op_sets():  # noqa: ANN202 - torch imported lazily
    import torch

    def ops(*names: str) -> set:
        found = set()
        for name in names:
            for owner in (torch, torch.Tensor):
                if hasattr(owner, name):
                    found.add(getattr(owner, name))
        return found

    binary = ops("add", "mul", "sub", "div", "true_divide", "multiply", "subtract", "__rsub__")
    binary |= ops("__radd__", "__rmul__", "__rtruediv__", "__rdiv__", "__add__", "__mul__")
    binary |= ops("__sub__", "__truediv__")
    inplace = ops("add_", "mul_", "sub_", "div_", "__iadd__", "__imul__", "__isub__")
    inplace |= ops("__itruediv__")
    unary = ops("exp", "log", "sigmoid", "tanh", "neg", "__neg__", "abs", "sqrt", "rsqrt")
    unary |= ops("float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "clamp")
    unary |= ops("clamp_min", "clamp_max", "clip")
    return binary, inplace, unary, ops("expand")


def _metadata(func) -> bool:  # noqa: ANN001
    """A read of a tensor's dtype/device/grad flag (changes nothing a per-sample value needs)."""
    owner = getattr(func, "__self__", None)
    name = getattr(owner, "__name__", None)
    return getattr(func, "__name__", "") == "__get__" and name in (
        "dtype",
        "device",
        "requires_grad",
        "is_cuda",
        "is_meta",
    )


class _UseTracker:
    """A ``TorchFunctionMode`` body: records how tracked tensors are used (see BatchFlow.uses)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.tracked: dict[int, tuple[object, str]] = {}  # id -> (tensor, key); keeps it alive
        self.uses: dict[str, int | str] = {}

    def track(self, tensor, key: str) -> None:  # noqa: ANN001
        self.tracked[id(tensor)] = (tensor, key)

    def _use(self, key: str, rank: int | str) -> None:
        old = self.uses.get(key)
        if isinstance(old, str):
            return
        if isinstance(rank, int) and old is not None and old != rank:
            rank = f"broadcast at ranks {old} and {rank}"
        self.uses[key] = rank

    def record(self, func, args: tuple, kwargs: dict, out) -> None:  # noqa: ANN001
        import torch
        from torch.utils import _pytree as pytree

        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        hits = [t for t in leaves if id(t) in self.tracked]
        if not hits or _metadata(func):
            return
        binary, inplace, unary, expand = _OPS
        name = getattr(func, "__name__", repr(func))
        tracked = hits[0]
        key = self.tracked[id(tracked)][1]
        if len({self.tracked[id(t)][1] for t in hits}) > 1 or len(hits) > 1 and func not in unary:
            for t in hits:
                self._use(self.tracked[id(t)][1], f"combined with another tracked tensor by {name}")
            return
        others = [t for t in leaves if t is not tracked]
        batched = [t for t in others if t.dim() and t.shape[0] == self.batch]
        if func in unary and not [t for t in others if t.dim()]:
            if isinstance(out, torch.Tensor) and out.shape == tracked.shape:
                self.track(out, key)
                return
        elif func in binary or (func in inplace and args and args[0] is not tracked):
            if not batched and isinstance(out, torch.Tensor) and out.shape == tracked.shape:
                if all(t.dim() == 0 for t in others):  # times a scalar: still the same value
                    self.track(out, key)
                    return
            ok = isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == self.batch
            if ok and len(batched) == len(others) == 1 and out.dim() == others[0].dim():
                r = out.dim()
                if tracked.dim() < r or (tracked.dim() == r and tracked.shape[0] == 1):
                    self._use(key, r)
                    return
        elif func in expand and args and args[0] is tracked and tracked.dim():
            sizes = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
            if tracked.shape[0] == 1 and sizes and sizes[0] == self.batch:
                self._use(key, tracked.dim())
                return
        self._use(key, f"used by {name}, not only broadcast elementwise into batched tensors")


def probe_batch_flow(module, inputs, kwargs=None, real=None) -> BatchFlow:  # noqa: ANN001
    """Run ``module`` on inputs with the batch sizes :data:`PROBE_BATCHES`.

    ``inputs`` are the example call's positional arguments (tensors on any device, or other
    values), the first a tensor whose first dimension is the batch; every positional tensor
    carries the batch. ``kwargs``, its keyword arguments (any pytree): a tensor in them carries
    the batch when its first dimension is the first input's. On ``meta`` nothing is computed or
    allocated: parameters and buffers are swapped for ``meta`` stand-ins. Where the forward
    branches on values (``if mask.all():``), ``meta`` cannot run it: then, if ``real`` is given
    (a callable returning the target built for real, or the module), the probe runs it on CPU
    with random inputs, up to :data:`REAL_PROBE_LIMIT` values.
    """
    import torch

    stand_ins = {
        name: t if t.device.type == "meta" else torch.empty_like(t, device="meta")
        for name, t in (*module.named_parameters(), *module.named_buffers())
    }
    flow = _probe(module, stand_ins, inputs, kwargs, "meta")
    if flow.error is None or real is None:
        return flow
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = real() if callable(real) and not isinstance(real, torch.nn.Module) else real
            values = sum(t.numel() for t in (*built.parameters(), *built.buffers()))
            if values > REAL_PROBE_LIMIT:
                return flow
            states = {
                name: t.detach().clone()
                for name, t in (*built.named_parameters(), *built.named_buffers())
            }
            runs = [_probe(built, states, inputs, kwargs, fill) for fill in ("randn", "zeros")]
    except Exception:  # noqa: BLE001 - the meta probe's error says why
        return flow
    ran = [run for run in runs if run.error is None]
    if not ran:
        return BatchFlow({}, f"{flow.error}; for real: {runs[0].error}")
    return _merge(ran)


def _merge(runs: list[BatchFlow]) -> BatchFlow:
    """One flow from real probes with different input values (each may take other branches):
    every call seen, every use seen (one that is not proven in some run is not proven)."""
    calls: dict[str, tuple[tuple[bool, ...], ...]] = {}
    uses: dict[str, int | str] = {}
    for run in runs:
        for path, flags in run.calls.items():
            calls[path] = calls.get(path, ()) + flags
        for key, use in run.uses.items():
            old = uses.get(key, use)
            if isinstance(old, str) or use == old:
                uses[key] = old
            else:
                uses[key] = use if isinstance(use, str) else "broadcast at different ranks"
    mutated = frozenset().union(*(run.mutated for run in runs))
    return BatchFlow(calls, None, uses, mutated, real=True)


_OPS: tuple = ()


def _use_mode(tracker: _UseTracker):  # noqa: ANN202
    """A ``TorchFunctionMode`` that shows every torch call to ``tracker``."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            tracker.record(func, args, kwargs, out)
            return out

    return Mode()


def _probe(module, stand_ins: dict, inputs, kwargs, fill: str) -> BatchFlow:  # noqa: ANN001
    """One probe, ``fill``: ``"meta"``, or real inputs, ``"randn"`` or ``"zeros"``."""
    import torch
    from torch.func import functional_call
    from torch.utils import _pytree as pytree

    global _OPS
    if not _OPS:
        _OPS = _op_sets()
    buffers = {name for name, _ in module.named_buffers()}
    versions = {name: stand_ins[name]._version for name in buffers if name in stand_ins}
    seen: list[dict[str, list[tuple[int | None, ...]]]] = []
    uses: list[dict[str, int | str]] = []
    generator = torch.Generator().manual_seed(0)
    example = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim())
    for batch in PROBE_BATCHES:
        calls: dict[str, list[tuple[int | None, ...]]] = {}
        tracker = _UseTracker(batch)
        for name, t in stand_ins.items():
            if name not in buffers:
                tracker.track(t, name)

        def record(path, _module, args, kwargs, calls=calls):  # noqa: ANN001
            tensors = pytree.tree_leaves((args, kwargs))
            dims = tuple(
                (t.shape[0] if t.dim() else None) for t in tensors if isinstance(t, torch.Tensor)
            )
            calls.setdefault(path, []).append(dims)

        def output(path, _module, args, kwargs, out, tracker=tracker, batch=batch):  # noqa: ANN001
            leaves = pytree.tree_leaves((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            if tensors and all(t.dim() and t.shape[0] == 1 for t in tensors) and batch != 1:
                if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == 1:
                    tracker.track(out, ">" + path)
                else:
                    tracker.uses[">" + path] = "its output is not one tensor with a leading 1"

        handles = []
        for path, sub in module.named_modules():
            handles.append(
                sub.register_forward_pre_hook(
                    lambda m, a, k, path=path: record(path, m, a, k), with_kwargs=True
                )
            )
            if path:
                handles.append(
                    sub.register_forward_hook(
                        lambda m, a, k, o, path=path: output(path, m, a, k, o), with_kwargs=True
                    )
                )

        def resize(x, batch=batch, example=example):  # noqa: ANN001, ANN202
            if not isinstance(x, torch.Tensor):
                return x
            if x.dim() and x.shape[0] == example:
                return _probe_input(x, (batch, *x.shape[1:]), fill, generator)
            if x.device.type == "meta":  # shared: its own shape, values made up for real
                return _probe_input(x, tuple(x.shape), fill, generator)
            return x.to("meta" if fill == "meta" else "cpu")

        xs = tuple(
            _probe_input(x, (batch, *x.shape[1:]), fill, generator)
            if isinstance(x, torch.Tensor)
            else x
            for x in inputs
        )
        kw = pytree.tree_map(resize, dict(kwargs or {}))
        try:
            with (
                torch.no_grad(),
                torch.device("meta" if fill == "meta" else "cpu"),
                _use_mode(tracker),
            ):  # tensors made in forward too
                functional_call(module, stand_ins, xs, kw)
        except Exception as exc:  # noqa: BLE001 - any failure only means "unknown"
            return BatchFlow(
                {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        finally:
            for handle in handles:
                handle.remove()
        seen.append(calls)
        uses.append(tracker.uses)
    first, second = seen
    flow: dict[str, tuple[tuple[bool, ...], ...]] = {}
    for path, dims in first.items():
        other = second.get(path, [])
        if len(other) != len(dims) or any(
            len(a) != len(b) for a, b in zip(dims, other, strict=False)
        ):
            flow[path] = ((False,),)  # calls differ between batch sizes: treat as shared
            continue
        flow[path] = tuple(
            tuple(
                a == PROBE_BATCHES[0] and b == PROBE_BATCHES[1] for a, b in zip(d1, d2, strict=True)
            )
            for d1, d2 in zip(dims, other, strict=True)
        )
    merged: dict[str, int | str] = {}
    for key in {*uses[0], *uses[1]}:
        a, b = uses[0].get(key), uses[1].get(key)
        if a is None or b is None:
            merged[key] = "used with one of the probe's batch sizes only"
        elif isinstance(a, str) or a == b:
            merged[key] = a
        else:
            merged[key] = b if isinstance(b, str) else "used differently with another batch size"
    mutated = frozenset(n for n, v in versions.items() if stand_ins[n]._version != v)
    return BatchFlow(flow, None, merged, mutated)


def _probe_input(x, shape: tuple, fill: str, generator):  # noqa: ANN001
    """A probe's input like ``x``, shaped ``shape``: ``meta``, or real values by ``fill``."""
    import torch

    if fill == "meta":
        return torch.empty(shape, dtype=x.dtype, device="meta")
    if x.dtype.is_floating_point and fill == "randn":
        return torch.randn(shape, generator=generator).to(x.dtype)
    if x.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=x.dtype)


def plan_torch_fusion(  # noqa: ANN001 - module: a torch nn.Module (torch imported lazily)
    module,
    layout: Layout,
    chunking: Chunking,
    *,
    linear_generator: bool = True,
    flow: BatchFlow | None = None,
) -> FusionPlan:
    """Decide, module by module, what the generated dynamic Torch file fuses.

    ``linear_generator=False`` (a weight generator with hidden layers): nothing is fused, the algebra
    above needs ``g`` linear in the embedding; the whole target runs per sample.

    ``flow`` (see :func:`probe_batch_flow`) says which inputs of each module carry the batch. A
    fused layer computes sample ``b`` from row ``b`` of its input, so a module that gets a
    shared input (GPT-2's position ids ``(1, L)``) is fused only where its output is proven to be
    broadcast into batched tensors (then its inputs are repeated per sample); a module run per
    sample needs one input with the batch first. Where neither holds, or the flow is unknown, the
    whole target runs per sample: the fast path is taken only where it is known to equal that
    reference. With a flow, a parameter used directly in a module's ``forward`` (a positional
    embedding, a scalar scale) gets one value per sample where the probe saw it only broadcast
    elementwise into batched tensors, and buffers its forward never writes (position ids) keep
    nothing per sample.
    """
    if not linear_generator:
        return _whole_target(NONLINEAR_GENERATOR)
    if flow is not None and flow.error is not None:
        return _whole_target(f"the forward cannot run to see where the batch goes ({flow.error})")
    index: dict[str, int] = {}  # every name a generated tensor has (tied ones have several)
    for i, t in enumerate(layout.generated):
        for keys in (t.keys, *t.aliases):
            index[".".join(map(str, keys))] = i
    generated_paths = set(index)
    owners: dict[str, list[str]] = {}
    for path in index:
        owner, _, _ = path.rpartition(".")
        owners.setdefault(owner, []).append(path)
    written: set[str] = set()  # modules whose buffers the forward may write
    for t in layout.state:
        if t.collection == "buffer" and (flow is None or t.path in flow.mutated):
            written.add(t.path.rpartition(".")[0])

    fused: list[FusedLayer] = []
    per_sample: list[str] = []
    reasons: list[tuple[str, str]] = []
    routes: list[tuple[str, str, str]] = []
    claimed: set[str] = set()  # submodules a fused parent computes (MultiheadAttention's out_proj)
    for path, sub in module.named_modules():
        if path in claimed:
            continue
        outer = next((p for p in per_sample if path.startswith(p + ".") or not p), None)
        if outer is not None:
            routes.append((path, "inside", outer or "<root>"))
            continue  # inside a module that already runs per sample
        own = owners.get(path, [])
        has_buffers = path in written
        if not own and not has_buffers:
            detail = "owns no generated tensor"
            if _has_buffers(sub):
                detail += "; its forward never writes its buffers" if flow else ""
            if flow is not None and path and path not in flow.calls:
                detail += "; never called"
            routes.append((path, "whole batch", detail))
            continue
        kind = torch_kind(sub)
        prefix = f"{path}." if path else ""
        weight, bias = f"{prefix}weight", f"{prefix}bias"
        if kind == "multihead_attention":
            weight, bias = f"{prefix}in_proj_weight", f"{prefix}in_proj_bias"
        why = _unfusible(sub, kind, weight, bias, own, has_buffers, generated_paths)
        if kind == "multihead_attention" and why is None:
            why, out_proj = _attention(sub, prefix, index, layout, chunking, flow)
            if why is None:
                fused.append(out_proj)
                claimed.add(out_proj.path)
                routes.append((out_proj.path, "fused", f"linear (S={out_proj.segments}), out_proj"))
        if kind is None and not has_buffers and flow is not None:
            direct = _direct(own, index, layout, flow)
            if isinstance(direct, str):
                why = direct
            else:
                fused += [FusedLayer(path, "direct", i, None, rank) for i, rank in direct]
                names = ", ".join(
                    f"{layout.generated[i].path.rpartition('.')[2]} at rank {rank}"
                    for i, rank in direct
                )
                routes.append((path, "fused", f"direct: parameters broadcast per sample ({names})"))
                continue
        broadcast = False
        if flow is not None and path:
            if not flow.batched_input(path):
                if why is None and kind != "batch_norm" and flow.broadcast_output(path):
                    broadcast = True
                else:
                    why = (
                        "none of its inputs has the batch first"
                        if path in flow.calls
                        else "it is never called"
                    )
                    use = flow.uses.get(">" + path)
                    if isinstance(use, str) and path in flow.calls:
                        why += f" and its output is {use}"
                    return _whole_target(f"{path}: {why}")
            elif why is None and kind != "multihead_attention" and flow.shared_input(path):
                why = "an input without the batch first (shared by every sample)"
        repeated = "; its shared inputs (leading 1) repeated per sample" if broadcast else ""
        if why is None and kind not in GEMM_KINDS:
            fused.append(FusedLayer(path, kind, index.get(weight), index.get(bias), 0, broadcast))
            routes.append((path, "fused", kind + repeated))
            continue
        if why is None:
            t = layout.generated[index[weight]]
            row = math.prod(t.shape[1:])
            s = segments(t.offset, t.shape[0], row, chunking.chunk_dim)
            if s > MAX_SEGMENTS:
                why = f"a weight row spans {s} chunks (more than {MAX_SEGMENTS})"
            else:
                fused.append(FusedLayer(path, kind, index[weight], index.get(bias), s, broadcast))
                routes.append((path, "fused", f"{kind} (S={s}){repeated}"))
                continue
        if flow is not None and path and flow.flags(path) is None:
            why = f"{path}: its calls differ in which inputs carry the batch"
            return _whole_target(why)
        per_sample.append(path)
        reasons.append((path, why))
        routes.append((path, "per sample", why))
    batched = tuple(
        (path, flow.flags(path) or ()) for path in per_sample if flow is not None and path
    )
    return FusionPlan(tuple(fused), tuple(per_sample), tuple(reasons), tuple(routes), batched)


def _whole_target(why: str) -> FusionPlan:
    """Every sample through the whole target alone (vmap), and why."""
    return FusionPlan((), (), (("", why),), (("", "per sample", why),))


def torch_kind(sub) -> str | None:  # noqa: ANN001
    """The batched form of a module, by its exact type (``None``: it has none)."""
    import sys

    from torch import nn

    name = type(sub).__name__
    if name in FUSIBLE and type(sub) is getattr(nn, name, None):
        return FUSIBLE[name]
    for module_name, class_name, kind in LIBRARY_KINDS:
        library = sys.modules.get(module_name)
        if library is not None and type(sub) is getattr(library, class_name, None):
            return kind
    return None


def _attention(sub, prefix, index, layout, chunking, flow):  # noqa: ANN001, ANN202
    """Why an nn.MultiheadAttention has no batched form here (None), and its out_proj layer."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    if not sub.batch_first:
        return "batch_first=False (the batch is not first)", None
    if not sub._qkv_same_embed_dim or sub.bias_k is not None or sub.add_zero_attn:
        return "kdim/vdim, add_bias_kv or add_zero_attn is set", None
    if sub.in_proj_bias is not None and f"{prefix}in_proj_bias" not in index:
        return "its in_proj_bias is not generated", None
    out = sub.out_proj
    if type(out) is not NonDynamicallyQuantizableLinear or f"{prefix}out_proj.weight" not in index:
        return "its out_proj is not a plain, generated Linear", None
    calls = flow.calls.get(prefix[:-1], ()) if flow is not None else ()
    if flow is not None and not all(len(f) >= 3 and all(f[:3]) for f in calls):
        return "its query, key and value do not all have the batch first", None
    t = layout.generated[index[f"{prefix}out_proj.weight"]]
    s = segments(t.offset, t.shape[0], t.shape[1], chunking.chunk_dim)
    if s > MAX_SEGMENTS:
        return f"an out_proj row spans {s} chunks (more than {MAX_SEGMENTS})", None
    i, b = index[f"{prefix}out_proj.weight"], index.get(f"{prefix}out_proj.bias")
    return None, FusedLayer(f"{prefix}out_proj", "linear", i, b, s)


def _has_buffers(sub) -> bool:  # noqa: ANN001
    return next(sub.buffers(recurse=False), None) is not None


def _direct(own, index, layout, flow) -> list[tuple[int, int]] | str:  # noqa: ANN001
    """Each parameter the module uses directly, with the rank it is broadcast at, or why not."""
    found = []
    for path in sorted(own):
        name = path.rpartition(".")[2]
        t = layout.generated[index[path]]
        use = flow.uses.get(path, "never used in the probe's forward")
        if t.aliases:
            return f"{name} is tied to another name"
        if isinstance(use, str):
            return f"{name} is {use}"
        if len(t.shape) > use:
            return f"{name} has more dimensions than the tensors it is broadcast into"
        found.append((index[path], use))
    return found


def _unfusible(sub, kind, weight, bias, own, has_buffers, generated) -> str | None:  # noqa: ANN001
    if kind is None:
        owned = ", ".join(sorted(path.rpartition(".")[2] for path in own))
        return f"{type(sub).__name__} has no fused form (" + (
            f"it owns {owned})" if owned else "its forward writes its buffers)"
        )
    if has_buffers and kind != "batch_norm":
        return "its forward writes its buffers"
    if kind in (*GEMM_KINDS, "embedding", "elementwise") and weight not in generated:
        return "its weight is not generated"
    if set(own) - {weight, bias}:
        return "it owns other generated tensors"
    if kind.startswith("conv") and getattr(sub, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={sub.padding_mode!r}"
    if kind == "embedding":
        if getattr(sub, "max_norm", None) is not None:  # padding_idx: the kernel detaches
            return "max_norm is set"
        if getattr(sub, "scale_grad_by_freq", False) or getattr(sub, "sparse", False):
            return "scale_grad_by_freq or sparse is set"
    if list(sub.children()) and kind != "multihead_attention":
        return "it has submodules"
    if kind == "elementwise":
        return _check_elementwise(sub)
    if kind == "transposed_linear":
        return _check_transposed_linear(sub)
    return None


def _sample_copy(sub):  # noqa: ANN001, ANN202
    """A CPU copy of a (possibly meta) module, with random parameters, to check a form on."""
    import copy

    import torch

    probe = copy.deepcopy(sub)
    if any(t.device.type == "meta" for t in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in probe.parameters():
            t.copy_(torch.randn(t.shape, generator=generator).to(t.dtype))
    return probe.float(), generator


def _check_elementwise(sub) -> str | None:  # noqa: ANN001
    """The weight is used elementwise: a weight per sample, shaped ``(batch, 1, ..., D)``, gives
    what each sample gets alone (checked on random values, so a library's changed forward is
    caught)."""
    import torch
    from torch.func import functional_call

    shapes = {n: tuple(t.shape) for n, t in sub.named_parameters()}
    if list(shapes) != ["weight"] or len(shapes["weight"]) != 1:
        return f"{type(sub).__name__} has parameters {shapes}, its form expects one 1-d weight"
    probe, generator = _sample_copy(sub)
    (d,) = shapes["weight"]
    x = torch.randn(2, 3, d, generator=generator)
    w = torch.randn(2, d, generator=generator) + 1.0
    try:
        with torch.no_grad():
            batched = functional_call(probe, {"weight": w.view(2, 1, d)}, (x,))
            each = torch.cat(
                [functional_call(probe, {"weight": w[b]}, (x[b : b + 1],)) for b in (0, 1)]
            )
    except Exception as exc:  # noqa: BLE001
        return f"its forward refuses a weight per sample ({type(exc).__name__})"
    if batched.shape != each.shape or not torch.allclose(batched, each, rtol=1e-5, atol=1e-6):
        return "its forward with a weight per sample differs from each sample alone"
    return None


def _check_transposed_linear(sub) -> str | None:  # noqa: ANN001
    """``forward(x) == x @ weight + bias`` with ``weight (in, out)`` (checked on random values)."""
    import torch

    shapes = {n: tuple(t.shape) for n, t in sub.named_parameters()}
    if len(shapes.get("weight", ())) != 2 or set(shapes) - {"weight", "bias"}:
        return f"{type(sub).__name__} has parameters {shapes}, its form expects weight (in, out)"
    probe, generator = _sample_copy(sub)
    x = torch.randn(2, 3, shapes["weight"][0], generator=generator)
    with torch.no_grad():
        expected = x @ probe.weight + (probe.bias if "bias" in shapes else 0.0)
        got = probe(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        return f"{type(sub).__name__}.forward is not x @ weight + bias"
    return None


# -- Static mode: Linear layers computed at rank D ------------------------------------------------


def plan_low_rank(  # noqa: ANN001 - module: a torch nn.Module (torch imported lazily)
    module, layout: Layout, chunking: Chunking, embedding_dim: int, args: tuple, kwargs: dict
) -> tuple[tuple[str, int], ...]:
    """The Linear layers a static Torch file computes at rank D: ``(path, weight index)`` each.

    Weight row ``o`` of a Linear whose rows each fill one chunk is ``shift + scale * (Wg E[first +
    o] + bg)``, so ``W x = (scale E_rows)(Wg^T x) + ((shift + scale bg) . x)``: ``D (in + out)``
    multiply-adds per input row instead of ``in out`` plus building W. Chosen where that is
    cheaper for any batch, for plain ``nn.Linear`` layers (exact type) whose weight has one name,
    and only if the example call runs on ``meta`` with those weights gone: nothing else in the
    forward reads them (a parent's ``F.linear(x, self.head.weight)`` would), else none is chosen.
    """
    import copy

    import torch
    from torch import nn

    index = {".".join(map(str, t.keys)): i for i, t in enumerate(layout.generated)}
    aliased = {".".join(map(str, a)) for t in layout.generated for a in t.aliases}
    chosen = []
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        i = index.get(prefix + "weight")
        if type(sub) is not nn.Linear or i is None or layout.generated[i].aliases:
            continue
        t = layout.generated[i]
        out, row = t.shape
        aligned = t.offset % chunking.chunk_dim == 0 and row == chunking.chunk_dim
        if aligned and embedding_dim * (row + out) < row * out and prefix + "bias" not in aliased:
            chosen.append((path, i))
    if not chosen:
        return ()
    # A copy on meta without the chosen weights, their forward a stand-in of the right shape.
    memo = {
        id(t): t if t.device.type == "meta" else torch.empty_like(t, device="meta")
        for t in (*module.parameters(), *module.buffers())
    }
    try:
        clone = copy.deepcopy(module, memo)
        for path, _ in chosen:
            sub = clone.get_submodule(path)
            del sub._parameters["weight"]
            stand_in = {"forward": lambda self, x: x.new_empty(*x.shape[:-1], self.out_features)}
            sub.__class__ = type("LowRankProbe", (nn.Linear,), stand_in)
        with torch.no_grad(), torch.device("meta"):
            clone(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the forward reads a weight elsewhere, or cannot run on meta
        return ()
    return tuple(chosen)
