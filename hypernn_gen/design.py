"""Hypernetwork options that shape the layout: chunking and the initialisation scheme.

The tracers say what the target is (:class:`~hypernn_gen.layout.Layout`); this module applies the
user's choices to it, once, for the runtime library and the generator alike, so both build the
same hypernetwork from the same options:

* ``chunking="flat"`` (hyper-nn's layout): the generated tensors lie end to end and a chunk may
  span two tensors. ``chunking="tensor"``: every tensor starts on a chunk boundary (the gaps are
  padding the hypernetwork generates and discards), so each chunk belongs to one tensor; without
  a chunk size, :func:`row_chunk` picks one that holds whole rows of the layers (S = 1: the
  fused dynamic path's floor). ``chunking="auto"`` (the default): ``"tensor"`` with
  :func:`row_chunk` when neither ``num_embeddings`` nor ``chunk_dim`` is given, else ``"flat"``
  (hyper-nn's layout for hyper-nn's arguments).
* ``init_scheme="target"`` (the default, variance-preserving): each generated tensor starts with the mean
  and standard deviation of the target's own initialisation. ``"hyperfan-in"`` and
  ``"hyperfan-out"``: the output variances of Chang, Sacramento and Wang, *Principled Weight
  Initialization for Hypernetworks* (ICLR 2020), for a generator whose raw output has unit
  variance: ``Var(W) = 1 / fan_in`` (or ``1 / fan_out``), halved when the layer's bias is generated
  too, with ``Var(b) = 1/2`` (hyperfan-in) or ``max(0, 1 - fan_in / fan_out)`` (hyperfan-out).
  The paper scales each layer's generator; with chunks shared across layers, the per-tensor
  scale of the decode gives the same variances. Tensors that are not weights or biases of a layer
  (norm scales, for instance) keep the target's statistics.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import TraceError
from .layout import Chunking, Layout, TensorSpec, round_stat

__all__ = [
    "BATCH_NORM_STATS",
    "CHUNKINGS",
    "INIT_SCHEMES",
    "apply_init",
    "GRADIENT_SCALINGS",
    "check_hidden",
    "chunk_layout",
    "chunk_owners",
    "group_gradient_multipliers",
    "group_rows",
    "std_groups",
    "design_layout",
    "gradient_multipliers",
    "parse_widths",
    "row_chunk",
    "row_cost",
]

CHUNKINGS = ("auto", "flat", "tensor")
INIT_SCHEMES = ("target", "hyperfan-in", "hyperfan-out")
GRADIENT_SCALINGS = ("on", "off")
#: dynamic BatchNorm in training: the whole batch's statistics (conditional BatchNorm), or each
#: sample's own
BATCH_NORM_STATS = ("batch", "sample")


def design_layout(
    layout: Layout,
    *,
    num_embeddings: int | None = None,
    chunk_dim: int | None = None,
    chunking: str = "auto",
    init_scheme: str = "target",
) -> tuple[Layout, Chunking]:
    """Apply the layout-shaping options: the initialisation scheme, then the chunking."""
    return chunk_layout(
        apply_init(layout, init_scheme),
        num_embeddings=num_embeddings,
        chunk_dim=chunk_dim,
        chunking=chunking,
    )


def chunk_layout(
    layout: Layout,
    *,
    num_embeddings: int | None = None,
    chunk_dim: int | None = None,
    chunking: str = "auto",
) -> tuple[Layout, Chunking]:
    """The layout with offsets for ``chunking``, and the number and size of its chunks.

    Give ``num_embeddings`` or ``chunk_dim`` (or neither: ``"flat"`` makes both about the square
    root of the generated parameter count, ``"tensor"`` takes :func:`row_chunk`, chunks holding
    whole rows); the other is derived.
    """
    if chunking not in CHUNKINGS:
        raise TraceError(f"unknown chunking {chunking!r}; choose one of {', '.join(CHUNKINGS)}")
    if chunking == "auto":  # no size given: chunks that hold whole rows; else hyper-nn's
        chunking = "tensor" if num_embeddings is None and chunk_dim is None else "flat"
    if chunking == "flat":
        return layout, Chunking.resolve(
            layout.flat_size, num_embeddings=num_embeddings, chunk_dim=chunk_dim
        )
    sizes = [t.size for t in layout.generated]
    if not sizes:
        Chunking.resolve(0)  # raises the usual "no generated parameters" error
    for name, value in (("num_embeddings", num_embeddings), ("chunk_dim", chunk_dim)):
        if value is not None and value <= 0:
            raise TraceError(f"{name} must be a positive integer, got {value}")
    if chunk_dim is None:
        if num_embeddings is None:
            chunk_dim = row_chunk(layout)
        else:
            chunk_dim = _smallest_chunk(sizes, num_embeddings)
    aligned = aligned_layout(layout, chunk_dim)
    needed = aligned.flat_size // chunk_dim
    if num_embeddings is not None and num_embeddings < needed:
        raise TraceError(
            f"chunking='tensor' with chunk_dim={chunk_dim} needs {needed} chunks (one tensor per "
            f"chunk at least), num_embeddings={num_embeddings} is too few; give only one of them"
        )
    return aligned, Chunking(num_embeddings or needed, chunk_dim)


#: The embedding size :func:`row_cost` assumes (the default ``embedding_dim``).
COST_EMBEDDING_DIM = 32
#: A default chunking may pad the generated values by at most this fraction of its output.
MAX_DEFAULT_PADDING = 0.5


def row_length(layout: Layout, t: TensorSpec) -> int:
    """The values of one output row of a 2-D+ tensor, as the fused path contracts it: Torch
    ``(out, in, *kernel)`` rows are ``in * kernel``; a Flax kernel ``(..., in, out)`` is
    contracted along rows of ``out``."""
    return t.shape[-1] if layout.framework in ("linen", "nnx") else t.size // t.shape[0]


def max_spans(rows: int, row: int, chunk_dim: int) -> int:
    """At most how many chunks one row spans, ``rows`` rows of ``row`` values from a chunk
    boundary (an upper bound: rows start at multiples of ``gcd(row, chunk_dim)``)."""
    if rows * row <= chunk_dim:
        return 1
    return (chunk_dim - math.gcd(row, chunk_dim) + row - 1) // chunk_dim + 1


def row_cost(layout: Layout, chunk_dim: int) -> int:
    """The predicted cost of ``chunking="tensor"`` with ``chunk_dim``: the shared products of
    the fused path (each 2-D+ tensor's values times the chunks a row spans, S; they are paid
    per sample, so they count twice), the padding the
    generator computes and discards, and the hypernetwork's own size (an embedding per chunk, a
    generator output per chunk value)."""
    products = sum(
        t.size * max_spans(t.size // row_length(layout, t), row_length(layout, t), chunk_dim)
        for t in layout.generated
        if len(t.shape) >= 2
    )
    padded = padded_size(layout, chunk_dim)
    hypernetwork = (padded // chunk_dim + chunk_dim) * COST_EMBEDDING_DIM  # table + generator
    return 2 * products + padded - layout.num_generated + hypernetwork  # products: per sample


def padded_size(layout: Layout, chunk_dim: int) -> int:
    """The flat size of :func:`aligned_layout` (every tensor from a chunk boundary)."""
    return sum(-(-t.size // chunk_dim) * chunk_dim for t in layout.generated)


def row_chunk(layout: Layout) -> int:
    """The default chunk size of ``chunking="tensor"``: the one with the smallest
    :func:`row_cost`, among multiples of the row lengths near ``sqrt(P)`` (up to 4x either
    way, or the row itself) and ``ceil(sqrt(P))``, padding at most
    :data:`MAX_DEFAULT_PADDING` of the output; ties go to the size nearest ``sqrt(P)``. Chunks
    that hold whole rows (S = 1) set the fused path's floor: one shared product per layer."""
    base = math.ceil(math.sqrt(layout.num_generated))
    candidates = {base}
    for row in {row_length(layout, t) for t in layout.generated if len(t.shape) >= 2}:
        low = max(1, -(-base // (4 * row)))
        candidates.update(row * m for m in range(low, low + 64) if row * m <= max(4 * base, row))

    def fits(c: int) -> bool:
        padded = padded_size(layout, c)
        return padded - layout.num_generated <= MAX_DEFAULT_PADDING * padded

    usable = [c for c in sorted(candidates) if c == base or fits(c)]
    return min(usable, key=lambda c: (row_cost(layout, c), abs(math.log(c / base)), c))


def aligned_layout(layout: Layout, chunk_dim: int) -> Layout:
    """``layout`` with every generated tensor starting at a multiple of ``chunk_dim``."""
    placed, offset = [], 0
    for t in layout.tensors:
        if t.generated:
            offset = -(-offset // chunk_dim) * chunk_dim
            placed.append(dataclasses.replace(t, offset=offset))
            offset += t.size
        else:
            placed.append(t)
    flat_size = -(-offset // chunk_dim) * chunk_dim
    return dataclasses.replace(layout, tensors=tuple(placed), flat_size=flat_size)


def _smallest_chunk(sizes: list[int], num_embeddings: int) -> int:
    """The smallest chunk size that fits every tensor, each from a chunk boundary, in the chunks."""
    if num_embeddings < len(sizes):
        raise TraceError(
            f"chunking='tensor' gives every generated tensor its own chunks: {len(sizes)} tensors "
            f"need num_embeddings >= {len(sizes)}, got {num_embeddings}"
        )
    lo, hi = 1, max(sizes)  # hi always fits: one chunk per tensor
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(-(-s // mid) for s in sizes) <= num_embeddings:
            hi = mid
        else:
            lo = mid + 1
    return lo


def apply_init(layout: Layout, scheme: str = "target") -> Layout:
    """``layout`` with each generated tensor's initial mean and std set by ``scheme``."""
    if scheme not in INIT_SCHEMES:
        raise TraceError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "target":
        return _zero_start(layout)
    generated = {t.keys: t for t in layout.generated}
    weights = {t.keys[:-1]: t for t in generated.values() if len(t.shape) >= 2}
    biased = {
        t.keys[:-1]
        for t in generated.values()
        if len(t.shape) == 1 and t.keys[:-1] in weights and _is_bias(t, weights[t.keys[:-1]])
    }
    tensors = []
    for t in layout.tensors:
        if t.generated:
            std = _hyperfan_std(t, scheme, weights.get(t.keys[:-1]), t.keys[:-1] in biased)
            if std is not None:
                t = dataclasses.replace(t, init_mean=0.0, init_std=std, init_source=scheme)
        tensors.append(t)
    return dataclasses.replace(layout, tensors=tuple(tensors))


#: A zero-initialised weight (ViT heads, DiT's adaLN-Zero) starts at this fraction of
#: ``1/sqrt(fan_in)`` instead: ``param_scale = 0`` would give the embedding and the generator
#: exactly zero gradient on the first backward (nothing upstream of the layer sees an error).
ZERO_START = 0.01
ZERO_SOURCE = "zero init: starts at 0.01/sqrt(fan_in)"


def _zero_start(layout: Layout) -> Layout:
    """``layout`` with every zero-initialised weight (2+ dimensions, not a bias, mean and std 0)
    given the
    small std :data:`ZERO_START` / sqrt(fan_in): the target's output starts near its own (the
    layer's output is about 1% of a default-initialised one) and gradients flow."""
    tensors = tuple(
        dataclasses.replace(
            t,
            init_std=round_stat(ZERO_START / math.sqrt(t.fan_in)),
            init_source=ZERO_SOURCE,
        )
        if t.generated
        and len(t.shape) >= 2
        and t.init_std == 0
        and t.init_mean == 0
        and t.keys[-1] not in ("bias", "b")
        else t
        for t in layout.tensors
    )
    return dataclasses.replace(layout, tensors=tensors)


def _is_bias(t: TensorSpec, weight: TensorSpec) -> bool:
    """A 1-D tensor beside a layer's weight with one value per output unit."""
    return t.shape[0] in (weight.shape[0], weight.shape[-1]) and t.keys[-1] in ("bias", "b")


def _hyperfan_std(
    t: TensorSpec, scheme: str, weight: TensorSpec | None, has_bias: bool
) -> float | None:
    if len(t.shape) >= 2:
        fan = t.fan_in if scheme == "hyperfan-in" else t.fan_out
        return round_stat(math.sqrt((0.5 if has_bias else 1.0) / fan))
    if weight is None or not _is_bias(t, weight):
        return None
    if scheme == "hyperfan-in":
        return round_stat(math.sqrt(0.5))
    return round_stat(math.sqrt(max(0.0, 1.0 - weight.fan_in / weight.fan_out)))


def gradient_multipliers(
    sizes: list[int] | tuple[int, ...],
    init_stds: list[float] | tuple[float, ...],
    num_embeddings: int,
    chunk_dim: int,
    embedding_dim: int,
) -> tuple[float, float, float]:
    """The gradient multipliers of the embedding table, the linear generator's weight and its
    bias, so that one SGD step moves the generated weights as much as it moves the target's own
    (the derivation is in docs/concepts.md, "Training with the target's optimizer").

    With ``N`` chunks of ``C`` values, embeddings of ``D`` values and ``s2`` the generated
    tensors' mean init variance (weighted by size, rounded to a power of two), the multipliers are ``sqrt(D / C) / s2``,
    ``1 / (s2 * sqrt(N * D))`` and ``1 / (s2 * sqrt(N))``; the decode's scale and shift of each
    tensor get ``1 / size`` (applied in the kernel). Rounded to 6 digits, as init statistics.
    """
    total = sum(sizes)
    s2 = sum(n * s * s for n, s in zip(sizes, init_stds, strict=True)) / total if total else 0.0
    # the nearest power of two: a coarse scale, the same whether the statistics were measured
    # (the runtime, from a live module) or known from the init function (generated files)
    s2 = 2.0 ** round(math.log2(s2)) if s2 else 1.0  # all constant: no scale to match
    return (
        round_stat(math.sqrt(embedding_dim / chunk_dim) / s2),
        round_stat(1.0 / (s2 * math.sqrt(num_embeddings * embedding_dim))),
        round_stat(1.0 / (s2 * math.sqrt(num_embeddings))),
    )


def layout_gradient_multipliers(
    layout: Layout, chunking: Chunking, embedding_dim: int, scaling: str
) -> tuple[float, float, float] | None:
    """:func:`gradient_multipliers` of a designed layout, the ``GRADIENT_SCALE`` of generated
    files and of the runtime (``scaling`` ``"off"``: ``None``, raw gradients)."""
    if scaling == "off":
        return None
    generated = layout.generated
    return gradient_multipliers(
        [t.size for t in generated],
        [t.init_std for t in generated],
        chunking.num_embeddings,
        chunking.chunk_dim,
        embedding_dim,
    )


def parse_widths(text: str | int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Hidden widths from ``"64,64"``, ``64``, ``[64, 64]``; ``"none"``/``""``/``[]`` is no layers."""
    if isinstance(text, int) and not isinstance(text, bool):
        return check_hidden((text,), "hidden widths")
    if isinstance(text, (list, tuple)):
        return check_hidden(tuple(text), "hidden widths")
    cleaned = str(text).strip().strip("()[]").strip()
    if cleaned.lower() in ("", "none"):
        return ()
    try:
        widths = tuple(int(p) for p in cleaned.split(",") if p.strip())
    except ValueError:
        raise TraceError(
            f"bad hidden widths {text!r}: expected comma-separated positive integers such as "
            "64,64, or none"
        ) from None
    return check_hidden(widths, "hidden widths")


def check_hidden(hidden: tuple[int, ...], what: str) -> tuple[int, ...]:
    """Validate hidden layer sizes of the weight generator or the embedding network."""
    hidden = tuple(hidden)
    bad = [h for h in hidden if not isinstance(h, int) or isinstance(h, bool) or h <= 0]
    if bad:
        raise TraceError(f"{what} must be positive integers (e.g. 64,64), got {bad[0]!r}")
    return hidden


#: The variance a zero-std tensor (LayerNorm weights and biases, zero-initialised biases) is
#: counted with in its group's multipliers: its decode scale starts at 0, so there is no init
#: variance to match; 1e-2 is the probe's choice (benchmarks/probe_char_lm.py), not derived.
ZERO_VARIANCE = 1e-2
#: The generator's parameter groups whose blocks of ``K = J Jᵀ`` add up on every generated
#: value (embedding table, head weight, head bias): each group's multiplier alone moves the
#: typical direction at the target's step, so each is divided by their number (concepts.md).
GENERATOR_BLOCKS = 3


def std_groups(init_stds: list[float] | tuple[float, ...]) -> tuple[int, ...]:
    """The generator group of every generated tensor: tensors with the same
    ``round(log2 init_std)`` share a group (one head and its embedding rows), zero-std tensors
    form one group; groups are numbered in order of their first tensor."""
    keys: dict[object, int] = {}
    return tuple(
        keys.setdefault("zero" if s == 0 else math.floor(math.log2(s) + 0.5), len(keys))
        for s in init_stds
    )


def chunk_owners(layout: Layout, chunking: Chunking) -> tuple[int, ...]:
    """The generated tensor (index in ``layout.generated``) every chunk belongs to, for a
    tensor-aligned layout (``chunking="tensor"``); trailing unused chunks belong to the last
    tensor (their values are discarded)."""
    c = chunking.chunk_dim
    owners = [len(layout.generated) - 1] * chunking.num_embeddings
    for i, t in enumerate(layout.generated):
        if t.offset % c:
            raise TraceError("chunk_owners needs a tensor-aligned layout (chunking='tensor')")
        for k in range(t.offset // c, -(-(t.offset + t.size) // c)):
            owners[k] = i
    return tuple(owners)


def group_rows(layout: Layout, chunking: Chunking) -> tuple[tuple[int, ...], ...]:
    """Per :func:`std_groups` group, the chunks (embedding rows) it generates, in order."""
    groups = std_groups([t.init_std for t in layout.generated])
    rows: list[list[int]] = [[] for _ in range(max(groups, default=-1) + 1)]
    for k, owner in enumerate(chunk_owners(layout, chunking)):
        rows[groups[owner]].append(k)
    return tuple(tuple(r) for r in rows)


def group_gradient_multipliers(
    layout: Layout, chunking: Chunking, embedding_dim: int
) -> tuple[tuple[float, float, float], ...]:
    """Per :func:`std_groups` group, the multipliers of its embedding rows, its head's weight
    and its head's bias: :func:`gradient_multipliers` of the group's own tensors and rows
    (zero-std tensors counted with :data:`ZERO_VARIANCE`), divided by
    :data:`GENERATOR_BLOCKS`."""
    generated = layout.generated
    groups = std_groups([t.init_std for t in generated])
    rows = group_rows(layout, chunking)
    out = []
    for g, r in enumerate(rows):
        members = [t for t, h in zip(generated, groups, strict=True) if h == g]
        stds = [t.init_std if t.init_std > 0 else math.sqrt(ZERO_VARIANCE) for t in members]
        m = gradient_multipliers(
            [t.size for t in members], stds, len(r), chunking.chunk_dim, embedding_dim
        )
        out.append(tuple(round_stat(x / GENERATOR_BLOCKS) for x in m))
    return tuple(out)
