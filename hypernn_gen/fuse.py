"""Plan the fused dynamic path: per-sample layers without per-sample weights.

With the default dynamic design, sample ``b``'s flat weights are
``g[b, p] = shift_t + scale_t * (s[b, p // C] * G0[p] + bg[p % C])`` where ``G0 = E Wg^T`` is
shared by all samples. For a Linear or Conv layer whose weight row ``o`` (one output channel,
flattened) spans the chunks ``first(o) .. first(o) + S - 1``:

    y_b[o] = sum_j s[b, first(o) + j] * (M_j x_b)[o] + (BG x_b)[o] + bias_b[o]

where ``M_j`` holds ``scale_t * G0`` on the elements of segment ``j`` (zero elsewhere) and
``BG = shift_t + scale_t * bg[p % C]``. ``S + 1`` shared GEMMs/convolutions, then a per-sample
weighted sum: no ``batch x P`` weights are ever built.

BatchNorm and LayerNorm normalise the whole batch at once (BatchNorm in training: each sample by
its own statistics, as a batch of one would be) and apply each sample's own weight and bias
(``batch x channels`` values); an Embedding computes only the entries it looks up.

Everything else that owns generated tensors (attention, a parameter used directly in a
``forward``) or buffers falls back to the materialising path for that module only: its own
tensors per sample, ``vmap`` over the batch. Parameter-free modules run on
the whole batch, which is what they would compute sample by sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .layout import Chunking, Layout

__all__ = ["BatchFlow", "FusionPlan", "FusedLayer", "plan_torch_fusion", "probe_batch_flow"]

#: Layers whose rows span more chunks than this are materialised instead (the shared GEMM grows
#: with the number of segments; past this point building the layer's weights is cheaper).
MAX_SEGMENTS = 16
NONLINEAR_GENERATOR = "the weight generator has hidden layers (not linear)"
FUSIBLE = {
    "Linear": "linear",
    "Conv1d": "conv1d",
    "Conv2d": "conv2d",
    "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm",
    "LayerNorm": "layer_norm",
    "Embedding": "embedding",
}
#: Kinds computed with a shared GEMM/convolution (the others need no segments).
GEMM_KINDS = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class FusedLayer:
    path: str  #: module path in the target, e.g. ``"0"`` or ``"features.3"``
    kind: str  #: a value of :data:`FUSIBLE`
    weight: int | None  #: index of the weight in ``layout.generated`` (``None``: none or kept)
    bias: int | None  #: index of the bias in ``layout.generated`` (``None``: none or kept)
    segments: int  #: chunks one output row spans at most (``S``); 0 for the other kinds


@dataclass(frozen=True)
class FusionPlan:
    fused: tuple[FusedLayer, ...]
    per_sample: tuple[str, ...]  #: module paths run per sample with materialised weights
    reasons: tuple[tuple[str, str], ...]  #: (module path, why it is not fused)
    #: (module path, flags) for each module in ``per_sample``: which tensors of its call
    #: (positional, then keyword, in any container) carry the batch, as the probe saw them
    batched: tuple[tuple[str, tuple[bool, ...]], ...] = ()

    def summary(self) -> str:
        if not self.fused:
            return "no layer fused: every generated tensor is materialised per sample"
        names = ", ".join(f.path or "<root>" for f in self.fused)
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


@dataclass(frozen=True)
class BatchFlow:
    """Where the batch goes inside the target, seen by running it on ``meta`` twice.

    ``calls[path]`` holds, for every call of the module at ``path``, one flag per tensor input
    (the tensors among the ``pytree`` leaves of ``(args, kwargs)``: positional, then keyword in
    call order, in any container): does its first dimension follow the batch? A module
    that was never called has no entry. ``error`` says why the target could not be run.
    """

    calls: dict[str, tuple[tuple[bool, ...], ...]]
    error: str | None = None

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


def probe_batch_flow(module, inputs, kwargs=None) -> BatchFlow:  # noqa: ANN001 - torch objects
    """Run ``module`` on ``meta`` inputs with the batch sizes :data:`PROBE_BATCHES`.

    ``inputs`` are the example call's positional arguments (tensors on any device, or other
    values), the first a tensor whose first dimension is the batch; every positional tensor
    carries the batch. ``kwargs``, its keyword arguments (any pytree): a tensor in them carries
    the batch when its first dimension is the first input's. Nothing is computed or allocated:
    parameters and buffers are swapped for ``meta`` stand-ins.
    """
    import torch
    from torch.func import functional_call
    from torch.utils import _pytree as pytree

    stand_ins = {
        name: t if t.device.type == "meta" else torch.empty_like(t, device="meta")
        for name, t in (*module.named_parameters(), *module.named_buffers())
    }
    seen: list[dict[str, list[tuple[int | None, ...]]]] = []
    example = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim())
    for batch in PROBE_BATCHES:
        calls: dict[str, list[tuple[int | None, ...]]] = {}

        def record(path, _module, args, kwargs, calls=calls):  # noqa: ANN001
            tensors = pytree.tree_leaves((args, kwargs))
            dims = tuple(
                (t.shape[0] if t.dim() else None) for t in tensors if isinstance(t, torch.Tensor)
            )
            calls.setdefault(path, []).append(dims)

        handles = [
            sub.register_forward_pre_hook(
                lambda m, a, k, path=path: record(path, m, a, k), with_kwargs=True
            )
            for path, sub in module.named_modules()
        ]

        def resize(x, batch=batch):  # noqa: ANN001, ANN202
            return torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta")

        xs = tuple(resize(x) if isinstance(x, torch.Tensor) else x for x in inputs)
        kw = pytree.tree_map(
            lambda x: (
                (resize(x) if x.dim() and x.shape[0] == example else x.to("meta"))
                if isinstance(x, torch.Tensor)
                else x
            ),
            dict(kwargs or {}),
        )
        try:
            with torch.no_grad(), torch.device("meta"):  # tensors made in forward too
                functional_call(module, stand_ins, xs, kw)
        except Exception as exc:  # noqa: BLE001 - any failure only means "unknown"
            return BatchFlow(
                {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        finally:
            for handle in handles:
                handle.remove()
        seen.append(calls)
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
    return BatchFlow(flow)


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
    shared input (GPT-2's position ids ``(1, L)``) is not fused; a module run per sample needs
    one input with the batch first. Where neither holds, or the flow is unknown, the whole target
    runs per sample: the fast path is taken only where it is known to equal that reference.
    """
    if not linear_generator:
        return FusionPlan((), (), (("", NONLINEAR_GENERATOR),))
    if flow is not None and flow.error is not None:
        why = f"the forward cannot run on meta to see where the batch goes ({flow.error})"
        return FusionPlan((), (), (("", why),))
    index: dict[str, int] = {}  # every name a generated tensor has (tied ones have several)
    for i, t in enumerate(layout.generated):
        for keys in (t.keys, *t.aliases):
            index[".".join(map(str, keys))] = i
    generated_paths = set(index)
    owners: dict[str, list[str]] = {}
    for path in index:
        owner, _, _ = path.rpartition(".")
        owners.setdefault(owner, []).append(path)
    buffer_owners = {t.path.rpartition(".")[0] for t in layout.state if t.collection == "buffer"}

    fused: list[FusedLayer] = []
    per_sample: list[str] = []
    reasons: list[tuple[str, str]] = []
    for path, sub in module.named_modules():
        if any(path == p or path.startswith(p + ".") if p else True for p in per_sample):
            continue  # inside a module that already runs per sample
        own = owners.get(path, [])
        has_buffers = path in buffer_owners
        if not own and not has_buffers:
            continue
        kind = FUSIBLE.get(type(sub).__name__)
        weight = f"{path}.weight" if path else "weight"
        bias = f"{path}.bias" if path else "bias"
        why = _unfusible(sub, kind, weight, bias, own, has_buffers, generated_paths)
        if flow is not None and path:
            if not flow.batched_input(path):
                why = (
                    "none of its inputs has the batch first"
                    if path in flow.calls
                    else "it is never called"
                )
                return FusionPlan((), (), (("", f"{path}: {why}"),))
            if why is None and flow.shared_input(path):
                why = "an input without the batch first (shared by every sample)"
        if why is None and kind not in GEMM_KINDS:
            fused.append(FusedLayer(path, kind, index.get(weight), index.get(bias), 0))
            continue
        if why is None:
            t = layout.generated[index[weight]]
            row = math.prod(t.shape[1:])
            s = segments(t.offset, t.shape[0], row, chunking.chunk_dim)
            if s > MAX_SEGMENTS:
                why = f"a weight row spans {s} chunks (more than {MAX_SEGMENTS})"
            else:
                fused.append(FusedLayer(path, kind, index[weight], index.get(bias), s))
                continue
        if flow is not None and path and flow.flags(path) is None:
            why = f"{path}: its calls differ in which inputs carry the batch"
            return FusionPlan((), (), (("", why),))
        per_sample.append(path)
        reasons.append((path, why))
    batched = tuple(
        (path, flow.flags(path) or ()) for path in per_sample if flow is not None and path
    )
    return FusionPlan(tuple(fused), tuple(per_sample), tuple(reasons), batched)


def _unfusible(sub, kind, weight, bias, own, has_buffers, generated) -> str | None:  # noqa: ANN001
    if kind is None:
        owned = ", ".join(sorted(path.rpartition(".")[2] for path in own))
        return f"{type(sub).__name__} has no fused form (" + (
            f"it owns {owned})" if owned else "it has buffers)"
        )
    if has_buffers and kind != "batch_norm":
        return "it has buffers"
    if kind in GEMM_KINDS + ("embedding",) and weight not in generated:
        return "its weight is not generated"
    if set(own) - {weight, bias}:
        return "it owns other generated tensors"
    if kind in ("conv1d", "conv2d"):
        if getattr(sub, "groups", 1) != 1:
            return "grouped convolution"
        if getattr(sub, "padding_mode", "zeros") != "zeros":
            return f"padding_mode={sub.padding_mode!r}"
    if kind == "embedding":
        for option in ("padding_idx", "max_norm"):
            if getattr(sub, option, None) is not None:
                return f"{option} is set"
        if getattr(sub, "scale_grad_by_freq", False) or getattr(sub, "sparse", False):
            return "scale_grad_by_freq or sparse is set"
    if list(sub.children()):
        return "it has submodules"
    return None
