"""The Flax kernel, shared by Linen and NNX: decoding, flat vector <-> tree, checks, batching, mesh.

Every function takes the layout it works on as arguments (``tensors``: a sequence of objects with
``keys``, ``shape``, ``offset``, ``size`` and ``dtype``; ``flat_size``; ``chunk_dim``), so the
runtime (a :class:`~hypernn_gen.layout.Layout`) and a generated file (its ``GENERATED`` table)
call the same code. ``error`` is the exception class a check raises (generated files:
``ValueError``; the runtime: ``HyperNetworkError``, a ``ValueError`` too).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization


def model_mesh(model_axis: str, chunk_dim: int, error: type[Exception] = ValueError) -> Any:
    """The mesh set with ``jax.set_mesh`` (an ``AbstractMesh``), checked for ``model_axis``;
    ``None`` without one (then ``model_axis`` annotates but splits nothing)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if model_axis not in mesh.shape:
        raise error(
            f"the mesh has no axis {model_axis!r} (its axes: {mesh.axis_names}); pass "
            "model_axis=<one of them> or None"
        )
    if mesh.axis_types[mesh.axis_names.index(model_axis)] != jax.sharding.AxisType.Auto:
        raise error(
            f"mesh axis {model_axis!r} is not of type Auto; build the mesh with "
            "jax.sharding.Mesh(devices, names) or "
            "jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)"
        )
    size = mesh.shape[model_axis]
    if chunk_dim % size:
        raise error(
            f"the chunk size {chunk_dim} does not split over the {size} devices of mesh axis "
            f"{model_axis!r}; use a chunk size that is a multiple of {size} (runtime: "
            "chunk_dim=..., generated file: regenerate with --chunk-dim)"
        )
    return mesh


def split_chunks(x: jax.Array, model_axis: str) -> jax.Array:
    """``x`` constrained to have its last dimension split over mesh axis ``model_axis`` (the
    other dimensions: XLA's choice); only under ``jax.set_mesh``."""
    unconstrained = [jax.sharding.PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.PartitionSpec(*unconstrained, model_axis)
    )


def concat_flat(pieces: list[jax.Array], offsets: list[int], flat_size: int) -> jax.Array:
    """Pieces ``(..., size)`` starting at ``offsets`` (ascending), concatenated into
    ``(..., flat_size)`` with zeros in the gaps (``chunking="tensor"`` pads between tensors)."""
    batch, dtype = pieces[0].shape[:-1], pieces[0].dtype
    out, end = [], 0
    for offset, piece in zip(offsets, pieces, strict=True):
        if offset > end:
            out.append(jnp.zeros((*batch, offset - end), dtype))
        out.append(piece)
        end = offset + piece.shape[-1]
    if flat_size > end:
        out.append(jnp.zeros((*batch, flat_size - end), dtype))
    return jnp.concatenate(out, axis=-1)


def scale_grad(x: jax.Array, factor: Any) -> jax.Array:
    """``x`` itself in the forward (exactly), its gradient times ``factor`` (a number, or an
    array broadcasting against ``x``) in the backward; ``None``: ``x`` untouched. The gradient
    multipliers of docs/concepts.md."""
    if factor is None:
        return x
    frozen = jax.lax.stop_gradient(x)
    return frozen + factor * (x - frozen)


def scaled_dense(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, weight_scale: Any, bias_scale: Any
) -> jax.Array:
    """``x @ kernel + bias`` over the last axis (as ``nn.Dense``/``nnx.Linear`` compute it), the
    gradients of the kernel and the bias multiplied by ``weight_scale`` and ``bias_scale``."""
    kernel = scale_grad(kernel, weight_scale)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + scale_grad(bias, bias_scale)


def decoder(
    scale: jax.Array, shift: jax.Array, tensors: Any, gradient_scale: Any
) -> tuple[jax.Array, jax.Array]:
    """The decode's ``scale`` and ``shift``; with gradient scaling (``gradient_scale`` given),
    each tensor's gradients divided by its size, the number of values they are summed over."""
    if gradient_scale is None:
        return scale, shift
    factors = np.asarray([1.0 / t.size for t in tensors], np.float32)
    return scale_grad(scale, factors), scale_grad(shift, factors)


def decode(
    raw: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    tensors: Any,
    flat_size: int,
    gradient_scale: Any = None,
) -> jax.Array:
    """``shift[t] + scale[t] * raw[slice of t]`` for every generated tensor ``t``.

    ``raw`` is ``(..., flat_size)``; ``scale``/``shift`` are ``(len(tensors),)``. One slice per
    tensor: XLA would constant-fold a repeated ``(flat_size,)`` scale table at compile time.
    ``gradient_scale``: the multipliers (see :func:`decoder`); ``None``: raw gradients.
    """
    scale, shift = decoder(scale, shift, tensors, gradient_scale)
    scale, shift = scale.astype(raw.dtype), shift.astype(raw.dtype)
    pieces = [
        shift[i] + scale[i] * raw[..., t.offset : t.offset + t.size] for i, t in enumerate(tensors)
    ]
    return concat_flat(pieces, [t.offset for t in tensors], flat_size)


def unflatten(flat: jax.Array, tensors: Any) -> dict:
    """The generated tensors as a nested dict keyed by each tensor's ``keys``, from ``flat`` of
    shape ``(..., flat_size)``; leading batch dims are kept, leaves cast to the tensor's dtype."""
    batch = flat.shape[:-1]
    tree: dict = {}
    for t in tensors:
        node = tree
        for key in t.keys[:-1]:
            node = node.setdefault(key, {})
        leaf = flat[..., t.offset : t.offset + t.size]
        node[t.keys[-1]] = leaf.reshape(*batch, *t.shape).astype(t.dtype)
    return tree


def check_flat(
    flat: Any, flat_size: int, dynamic: bool, error: type[Exception] = ValueError
) -> None:
    """``generated_params`` must be ``(flat_size,)`` (static) or ``(batch, flat_size)``."""
    shape = tuple(getattr(flat, "shape", ()))
    if len(shape) != (2 if dynamic else 1) or shape[-1] != flat_size:
        expected = f"(batch, {flat_size})" if dynamic else f"({flat_size},)"
        raise error(
            f"generated_params has shape {shape}, expected {expected}; build it with "
            "flatten_params()"
        )


def digest_array(digest: str) -> jax.Array:
    """The checkpoint digest (16 hex digits) as the 8 bytes saved variables carry, stored as
    float32 (exact, and exact in bfloat16 too): ``jax.grad`` over all variables still works
    (its gradient is zero), which an integer leaf would refuse."""
    return jnp.asarray(list(bytes.fromhex(digest)), jnp.float32)


def check_digest(saved: Any, digest: str, error: type[Exception] = ValueError) -> None:
    """Refuse variables saved from a hypernetwork of another layout (other tensors, offsets,
    chunking, mode or sizes; shapes alone cannot tell). ``None`` (saved before digests existed)
    passes; so do traced values (inside ``jax.jit``): the check runs where values are concrete."""
    if saved is None or isinstance(saved, jax.core.Tracer):
        return
    found = bytes(np.asarray(saved).astype(np.uint8).tolist()).hex()
    if found != digest:
        raise error(
            f"the variables were saved from a hypernetwork of another layout (digest {found}, "
            f"this one's is {digest}): their values would land on other tensors; load them into "
            "the hypernetwork they were saved from, or regenerate this one with that target and "
            "those options"
        )


def is_key(x: Any) -> bool:
    """A typed PRNG key array (``jax.random.key``)."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_array(x: Any) -> bool:
    """An array input (batched per sample; not a PRNG key); anything else is passed to every
    sample as is."""
    return isinstance(x, jax.Array | np.ndarray) and not is_key(x)


def check_batch(inputs: tuple, batch: int, error: type[Exception] = ValueError) -> None:
    """Every positional array input must have the leading batch dimension ``batch``."""
    for i, x in enumerate(inputs):
        if is_array(x) and (x.ndim == 0 or x.shape[0] != batch):
            size = x.shape[0] if x.ndim else "none (a scalar)"
            raise error(
                f"dynamic mode made {batch} weight sets (condition batch {batch}) but input {i} "
                f"has batch size {size}; give the target inputs and the condition the same "
                "leading batch dimension"
            )


def split_call(
    args: tuple,
    kwargs: dict,
    batch: int,
    rngs_type: Any = None,
    error: type[Exception] = ValueError,
) -> tuple[list, Any]:
    """The per-sample parts of a call ``(args, kwargs)``, and ``one(parts) -> (args, kwargs)``
    that rebuilds sample ``b``'s call from its parts (inside ``jax.vmap``).

    Per sample: an array with the leading batch dimension (sample ``b`` gets row ``b``, as a
    batch of one), by position or keyword; a single typed PRNG key and an ``nnx.Rngs``
    (``rngs_type``), split so that each sample draws from keys of its own, as each row of the
    plain target's batch does. Shared: everything else (flags, ``None``, 0-d keyword arrays). A
    keyword array without the batch dimension is refused: which dimension is the batch cannot be
    known.
    """
    values = [*args, *kwargs.values()]
    parts, kinds = [], []
    for i, x in enumerate(values):
        kind = None
        if is_key(x) and x.ndim == 0:
            kind, x = "key", jax.random.split(x, batch)
        elif rngs_type is not None and isinstance(x, rngs_type):
            kind, x = "rngs", {name: jax.random.split(s(), batch) for name, s in x.items()}
        elif (is_array(x) or is_key(x)) and (i < len(args) or x.ndim):
            if x.shape[0] != batch:
                raise error(
                    f"dynamic mode made {batch} weight sets but keyword argument "
                    f"{list(kwargs)[i - len(args)]!r} has shape {tuple(x.shape)}, whose first "
                    f"dimension is not that batch; each sample runs alone: give it the batch "
                    "dimension first (jnp.broadcast_to) or build it inside the target"
                )
            kind = "row"
        if kind is not None:
            parts.append(x)
            kinds.append((i, kind))

    def one(xs: list) -> tuple[list, dict]:
        out = list(values)
        for (i, kind), x in zip(kinds, xs, strict=True):
            out[i] = x[None] if kind == "row" else rngs_type(**x) if kind == "rngs" else x
        return out[: len(args)], dict(zip(kwargs, out[len(args) :], strict=True))

    return parts, one


#: The ``jax.vmap`` axis of a dynamic hypernetwork's samples.
SAMPLE_AXIS = "hypernn_samples"

#: How a BatchNorm in training mode normalises a dynamic hypernetwork's samples: ``batch``
#: (conditional BatchNorm: statistics over the whole batch, as the plain target's, each sample's
#: own scale and bias) or ``sample`` (each sample by its own statistics, as a batch of one).
BATCH_NORM_STATS = ("batch", "sample")


def sample_axes(
    axis_name: Any, groups: Any, stats: str, error: type[Exception] = ValueError
) -> Any:
    """A BatchNorm's ``axis_name`` for one sample (inside ``jax.vmap`` over ``SAMPLE_AXIS``):
    ``stats="batch"``: ``SAMPLE_AXIS`` first, then the devices' axes (statistics over the
    samples and devices, as the plain target's over its batch); ``"sample"``: as it is.
    """
    if stats == "sample":
        return axis_name
    if groups is not None:
        raise error(
            "a BatchNorm with axis_index_groups cannot take statistics over the samples of a "
            "dynamic hypernetwork (its groups name devices, not samples); drop "
            "axis_index_groups or generate with --batch-norm-stats sample"
        )
    names = () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return (SAMPLE_AXIS, *names)


def check_sample_reduction(x: Any, where: str, error: type[Exception] = ValueError) -> None:
    """Refuse BatchNorm statistics over the samples (a reduction over the ``jax.vmap`` axis) of
    an input that varies over a ``shard_map`` axis under ``check_vma=True``: JAX (0.10) fails
    there with a bare AssertionError."""
    aval = jax.typeof(x) if is_array(x) else None
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; older: aval.vma
    if getattr(manual, "varying", None) or getattr(aval, "vma", None):
        raise error(
            f"{where} in training mode takes its statistics over the samples, which JAX cannot "
            "do inside shard_map with check_vma=True; call shard_map with check_vma=False, or "
            "generate with --batch-norm-stats sample (each sample's own statistics)"
        )


def per_sample(x: jax.Array, batch: int) -> jax.Array:
    """``batch`` copies of a state array (typed rng keys: ``batch`` independent keys)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(x, batch)
    return jnp.broadcast_to(x, (batch, *x.shape))


def merge_samples(old: jax.Array, new: jax.Array) -> jax.Array:
    """Per-sample copies ``(batch, ...)`` written back: floats ``old + mean(new - old)``, rng keys
    ``old``, anything else sample 0's. Unchanged copies (eval mode) give back ``old`` exactly."""
    if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
        return old
    if jnp.issubdtype(old.dtype, jnp.inexact):
        return old + (new - old).mean(0).astype(old.dtype)
    return new[0]


def squeeze_sample(tree: Any) -> Any:
    """Drop the per-sample batch of 1 from every output leaf (as ``torch.squeeze(0)`` does)."""
    return jax.tree.map(lambda o: o[0] if is_array(o) and o.ndim and o.shape[0] == 1 else o, tree)


def get_path(tree: Any, keys: tuple) -> Any:
    """The leaf of ``tree`` at ``keys`` (an ``nnx.Variable``'s value, not the Variable)."""
    for key in keys:
        tree = tree[key]
    return tree.get_value() if hasattr(tree, "get_value") else tree


def flatten(
    params: Any, tensors: Any, flat_size: int, error: type[Exception] = ValueError
) -> jax.Array:
    """The flat vector ``(..., flat_size)`` for a tree holding the generated tensors (a Linen
    ``params`` tree, an ``nnx.State`` or pure dict); leading batch dims (the same on every leaf)
    are kept. The inverse of :func:`unflatten`."""
    pieces = []
    for t in tensors:
        try:
            leaf = jnp.asarray(get_path(params, t.keys))
        except (KeyError, IndexError, TypeError) as exc:
            raise error(
                f"flatten_params: the parameter tree has no {t.path!r}; pass the target's own "
                "params tree (Linen: variables['params'], NNX: nnx.state(target, nnx.Param))"
            ) from exc
        if leaf.shape[leaf.ndim - len(t.shape) :] != tuple(t.shape):
            raise error(
                f"flatten_params: {t.path!r} has shape {leaf.shape}, the layout says {t.shape}; "
                "pass parameters of the target the hypernetwork was built for"
            )
        pieces.append(leaf.reshape(*leaf.shape[: leaf.ndim - len(t.shape)], -1))
    return concat_flat(pieces, [t.offset for t in tensors], flat_size)


def check_params(found: dict, expected: dict, fix: str) -> None:
    """Refuse a target whose parameter shapes ``found`` (keys -> shape) differ from the layout's
    ``expected``; ``fix`` ends the message."""
    if found != expected:
        diff = next(
            (
                f"{'.'.join(map(str, keys))}: {shape} expected, found {found.get(keys, 'nothing')}"
                for keys, shape in expected.items()
                if found.get(keys) != shape
            ),
            f"{len(expected)} parameters expected, the target has {len(found)}",
        )
        raise ValueError(
            f"this target's parameters differ from the layout this file was generated for "
            f"({diff}); {fix}"
        )


# -- Fused per-sample layers: per-sample outputs without per-sample weights --
#
# Sample b's flat weights are g[b, p] = shift + scale * (s[b, p // chunk_dim] * g0[p] + bg[p % chunk_dim])
# (s: per-sample embedding scales, g0: the generator applied to the shared table, without its
# bias bg). Row r of a Dense/Conv kernel (one input feature; Conv: one input feature at one
# window position) holds `out` consecutive values, in the chunks first(r) .. first(r) + S - 1, so
#     y_b = [x_b * s_b[first + 0], ..., x_b * s_b[first + S - 1], x_b] @ stack
# with `stack` ((S + 1) * rows, out) shared by all samples: under vmap, one GEMM for the whole
# batch (Conv: on the input's patches). Every other generated tensor is materialised per sample.


class FusedLayer(NamedTuple):
    """A Dense/Linear/Conv layer computed from shared weights: its module path in the target,
    the indices of its kernel and bias in the layout (bias None: no bias), and S."""

    path: tuple
    kernel: int
    bias: int | None
    segments: int


def kernel_rows(kernel: Any) -> Any:
    """A kernel ``(*window, in, out)`` as rows ``(in * prod(window), out)``, in the order of the
    input's patches (input feature first); a Dense kernel ``(in, out)`` stays as it is."""
    n = kernel.ndim
    return kernel.transpose(n - 2, *range(n - 2), n - 1).reshape(-1, kernel.shape[-1])


def fused_indices(
    layer: FusedLayer, tensors: Any, chunk_dim: int, num_embeddings: int
) -> tuple[np.ndarray, np.ndarray]:
    """Constants of a fused kernel, as rows: the flat position of each value, and the chunk of
    each (segment, row), ``(S, rows)``."""
    p = tensors[layer.kernel]
    position = kernel_rows(p.offset + np.arange(p.size).reshape(p.shape))
    chunk = position[:, 0] // chunk_dim + np.arange(layer.segments)[:, None]
    return position, np.minimum(chunk, num_embeddings - 1)


class Shared(NamedTuple):
    """What every sample's generated tensors are made of (see above), and the layout."""

    table: jax.Array  # (num_embeddings, embedding_dim): the embedding table E
    kernel: jax.Array  # (embedding_dim, chunk_dim): the linear generator's kernel Wg
    bias: jax.Array  # (chunk_dim,): the generator's bias
    param_scale: jax.Array
    param_shift: jax.Array
    tensors: tuple  # the layout's generated tensors
    fused: tuple[FusedLayer, ...]
    num_embeddings: int
    g0s: tuple  # per tensor: the generator on its chunks' rows, without its bias (None: unused)
    decoded: dict | None = None  # static (:func:`static_inputs`): the tensors not rank-D, built

    def g0(self, p: Any) -> jax.Array:
        """The generator on the table without its bias, at the positions of ``p``, ``p.shape``."""
        g0 = self.g0s[self.tensors.index(p)]
        start = p.offset % self.bias.shape[0]
        return g0[start : start + p.size].reshape(p.shape)

    def chunk_bias(self, p: Any) -> jax.Array:
        """``bias[position % chunk_dim]`` for the values of ``p``, ``p.shape`` (tiled, not
        gathered: its gradient is a sum, not a scatter)."""
        chunk_dim = self.bias.shape[0]
        start = p.offset % chunk_dim
        tiled = jnp.tile(self.bias, -(-(start + p.size) // chunk_dim))
        return tiled[start : start + p.size].reshape(p.shape)

    def materialise(self, i: int, scales: jax.Array) -> jax.Array:
        """Tensor ``i`` for one sample, from its embedding scales ``(num_embeddings,)``
        (static: as :func:`static_inputs` built it)."""
        if self.decoded is not None:
            return self.decoded[i]
        p, chunk_dim = self.tensors[i], self.bias.shape[0]
        first, start = divmod(p.offset, chunk_dim)  # the chunks p spans, repeated, not gathered
        scale = jnp.repeat(scales[first : first + (start + p.size - 1) // chunk_dim + 1], chunk_dim)
        scale = scale[start : start + p.size].reshape(p.shape)
        raw = scale * self.g0(p) + self.chunk_bias(p)
        return (self.param_shift[i] + self.param_scale[i] * raw).astype(p.dtype)

    def params(self, scales: jax.Array) -> dict:
        """One sample's tree of the tensors not fused (keyed like ``unflatten``)."""
        fused = {i for layer in self.fused for i in (layer.kernel, layer.bias)}
        params: dict = {}
        for i, p in enumerate(self.tensors):
            if i not in fused:
                node = params
                for key in p.keys[:-1]:
                    node = node.setdefault(key, {})
                node[p.keys[-1]] = self.materialise(i, scales)
        return params

    def low_rank(self, layer: FusedLayer) -> bool:
        """See :func:`low_rank`."""
        return low_rank(self.tensors[layer.kernel], self.bias.shape[0], self.table.shape[1])

    def stack(self, layer: FusedLayer) -> jax.Array | None:
        """The layer's weights shared by all samples, ``((S + 1) * rows, out)``: the kernel's
        values in segment 0 .. S - 1 of their rows (zero elsewhere), then its constant part;
        ``None`` for a layer computed in the rank-D form."""
        if self.low_rank(layer):
            return None
        i, p, chunk_dim = layer.kernel, self.tensors[layer.kernel], self.bias.shape[0]
        position, chunk = fused_indices(layer, self.tensors, chunk_dim, self.num_embeddings)
        segment = position // chunk_dim - chunk[0][:, None]
        w0 = self.param_scale[i] * kernel_rows(self.g0(p))
        parts = [jnp.where(segment == j, w0, 0.0) for j in range(layer.segments)]
        parts.append(self.param_shift[i] + self.param_scale[i] * kernel_rows(self.chunk_bias(p)))
        # The barrier keeps XLA from folding the construction into every sample's GEMM.
        return jax.lax.optimization_barrier(jnp.concatenate(parts).astype(p.dtype))


def shared_inputs(
    generator: Callable,
    table: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    tensors: Any,
    fused: Any,
    gradient_scale: Any = None,
) -> Shared:
    """What all samples share: the embedding ``table``, the (linear) ``generator``'s kernel and
    bias (:func:`linear_weights`), the decoder's ``scale`` and ``shift``; ``fused``: plain
    ``(path, kernel, bias, segments)`` tuples. ``gradient_scale``: the multipliers of the
    table, the generator's weight and bias (the generator applies its own), or ``None``."""
    if gradient_scale is not None:
        table = scale_grad(table, gradient_scale[0])
    scale, shift = decoder(scale, shift, tensors, gradient_scale)
    kernel, bias = linear_weights(generator, table)
    if gradient_scale is not None:  # read from the parameters: the generator's multipliers
        kernel = scale_grad(kernel, gradient_scale[1])
        bias = scale_grad(bias, gradient_scale[2])
    layers = tuple(FusedLayer(*layer) for layer in fused)
    chunk_dim, dim = bias.shape[0], table.shape[1]
    rank_d = {layer.kernel for layer in layers if low_rank(tensors[layer.kernel], chunk_dim, dim)}
    # the generator on the whole table, one product (unless only rank-D layers), sliced
    full = (generator(table) - bias).reshape(-1) if len(rank_d) < len(tensors) else None
    g0s = []
    for i, p in enumerate(tensors):
        first = p.offset // chunk_dim * chunk_dim
        end = first + -(-(p.offset - first + p.size) // chunk_dim) * chunk_dim
        g0s.append(None if full is None or i in rank_d else full[first:end])
    return Shared(
        table, kernel, bias, scale, shift, tuple(tensors), layers, table.shape[0], tuple(g0s)
    )


def static_inputs(
    generator: Callable,
    table: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    tensors: Any,
    low_rank_layers: Any,
    gradient_scale: Any = None,
) -> Shared:
    """A static hypernetwork's one weight set without the flat vector: the Dense layers in
    ``low_rank_layers`` (plain ``(path, kernel, bias, segments)`` tuples, each passing
    :func:`low_rank`) computed in the rank-D form, their kernels never built; every other tensor
    decoded as :func:`decode` does, from the generator on its own chunks only (one product per
    run of adjacent chunks). ``table``: the embedding module's output (its multiplier applied)."""
    layers = tuple(FusedLayer(*layer) for layer in low_rank_layers)
    scale, shift = decoder(scale, shift, tensors, gradient_scale)
    kernel, bias = linear_weights(generator, table)
    if gradient_scale is not None:  # read from the parameters: the generator's multipliers
        kernel = scale_grad(kernel, gradient_scale[1])
        bias = scale_grad(bias, gradient_scale[2])
    chunk_dim, skip = bias.shape[0], {layer.kernel for layer in layers}
    spans = sorted(
        (p.offset // chunk_dim, (p.offset + p.size - 1) // chunk_dim + 1, i)
        for i, p in enumerate(tensors)
        if i not in skip
    )
    runs: list[list[int]] = []  # [first, end) chunk runs holding the tensors to build
    for first, end, _ in spans:
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([first, end])
    raws = [generator(table[first:end]).reshape(-1) for first, end in runs]
    decoded = {}
    for first, _, i in spans:
        n, p = next(n for n, (a, b) in enumerate(runs) if a <= first < b), tensors[i]
        start = p.offset - runs[n][0] * chunk_dim
        raw = raws[n][start : start + p.size]
        value = shift[i].astype(raw.dtype) + scale[i].astype(raw.dtype) * raw
        decoded[i] = value.reshape(p.shape).astype(p.dtype)
    return Shared(
        table,
        kernel,
        bias,
        scale,
        shift,
        tuple(tensors),
        layers,
        table.shape[0],
        (None,) * len(tensors),
        decoded,
    )


def low_rank(p: Any, chunk_dim: int, dim: int) -> bool:
    """Whether a fused kernel ``p`` is a Dense one (2-D; a Conv kernel has 3+ dimensions) whose
    rows lie whole in chunks, ``k = chunk_dim // out`` rows to a chunk from a chunk boundary,
    and the rank-``dim`` form (:func:`low_rank_output`) costs less per sample than the stacked
    GEMM (``2 * rows * out``)."""
    if len(p.shape) != 2 or p.offset % chunk_dim or chunk_dim % p.shape[-1]:
        return False
    return dim * (p.shape[0] + chunk_dim) <= 2 * p.size


def linear_weights(generator: Any, table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kernel ``(embedding_dim, chunk_dim)`` and bias of a linear weight generator, read
    from its parameters (exactly): its ``linear`` layer, an NNX ``nnx.Linear`` attribute or a
    bound Linen ``nn.Dense`` (called once first, which creates its parameters in ``init``)."""
    linear = getattr(generator, "linear", None)
    if linear is not None and hasattr(linear, "kernel"):  # NNX
        return linear.kernel[...], linear.bias[...]
    generator(table[:1])  # Linen: the parameters exist once the generator has run
    params = generator.variables["params"]["linear"]
    return params["kernel"], params["bias"]


def conv_patches(module: Any, x: jax.Array) -> jax.Array:
    """The patches ``(..., *spatial, in * prod(window))`` that the Conv ``module`` convolves."""
    window = tuple(module.kernel_size)
    n = len(window)

    def per_axis(value: Any) -> tuple[int, ...]:
        return (
            (1,) * n if value is None else (value,) * n if isinstance(value, int) else tuple(value)
        )

    padding = module.padding
    if isinstance(padding, int):
        padding = [(padding, padding)] * n
    elif not isinstance(padding, str):
        padding = [(q, q) if isinstance(q, int) else tuple(q) for q in padding]
    spec = (0, n + 1, *range(1, n + 1))
    patches = jax.lax.conv_general_dilated_patches(
        x.reshape(-1, *x.shape[x.ndim - n - 1 :]),
        window,
        per_axis(module.strides),
        padding,
        lhs_dilation=per_axis(module.input_dilation),
        rhs_dilation=per_axis(module.kernel_dilation),
        dimension_numbers=jax.lax.ConvDimensionNumbers(spec, (n + 1, n, *range(n)), spec),
        precision=jax.lax.Precision.HIGHEST,  # patches are copies of the input: keep them exact
    )
    return patches.reshape(*x.shape[: x.ndim - n - 1], *patches.shape[1:])


def fused_output(
    layer: FusedLayer,
    stack: jax.Array | None,
    shared: Shared,
    scales: jax.Array,
    module: Any,
    x: jax.Array,
    conv: bool,
) -> jax.Array:
    """One sample's output of a fused Dense/Linear (``conv``: Conv) ``module`` for its input."""
    if stack is None:
        return low_rank_output(layer, shared, scales, module, x)
    if conv:
        x = conv_patches(module, x)
    _, chunk = fused_indices(layer, shared.tensors, shared.bias.shape[0], shared.num_embeddings)
    coeff = jnp.concatenate([scales[chunk], jnp.ones((1, chunk.shape[1]), scales.dtype)])
    dtype = module.dtype or jnp.result_type(x, stack)
    x = (x[..., None, :] * coeff).reshape(*x.shape[:-1], -1)  # (..., (S + 1) * rows)
    y = jnp.matmul(x.astype(dtype), stack.astype(dtype), precision=module.precision)
    if layer.bias is not None:
        y = y + shared.materialise(layer.bias, scales).astype(dtype)
    return y


def low_rank_output(
    layer: FusedLayer, shared: Shared, scales: jax.Array, module: Any, x: jax.Array
) -> jax.Array:
    """One sample's output of a Dense layer whose kernel rows lie whole in chunks
    (:meth:`Shared.low_rank`). Row ``r = q k + h`` of the kernel is ``shift + scale * (s[first
    + q] * (E[first + q] Wg)[h] + bg[h])`` (``[h]``: the h-th piece of ``out`` values), so
    ``x W = scale * sum_h (sum_q x[r] s[first + q] E[first + q]) Wg[h] + sum_h (sum_q x[r])
    (shift + scale * bg[h])``: products of size ``rows x D`` and ``k x D x out``, no weights."""
    i, p = layer.kernel, shared.tensors[layer.kernel]
    (rows, out), dim = p.shape, shared.table.shape[1]
    k = shared.bias.shape[0] // out
    first, count = p.offset // shared.bias.shape[0], -(-rows // k)
    dtype = module.dtype or jnp.result_type(x, shared.table)
    x = x.astype(dtype)
    if scales is None:  # static: one weight set, every chunk's scale 1
        xs = x
    else:
        xs = x * jnp.repeat(scales[first : first + count], k)[:rows].astype(dtype)
    if count * k > rows:  # the last chunk holds fewer rows: the rest is padding
        pad = [(0, 0)] * (x.ndim - 1) + [(0, count * k - rows)]
        x, xs = jnp.pad(x, pad), jnp.pad(xs, pad)
    lead = x.shape[:-1]
    table = shared.table[first : first + count].astype(dtype)
    u = jnp.einsum(
        "...qh,qd->...hd", xs.reshape(*lead, count, k), table, precision=module.precision
    )
    kernel = shared.kernel.reshape(dim, k, out).astype(dtype)
    y = jnp.einsum("...hd,dho->...o", u, kernel, precision=module.precision)
    fixed = shared.param_shift[i] + shared.param_scale[i] * shared.bias.reshape(k, out)
    sums = x.reshape(*lead, count, k).sum(-2)
    y = shared.param_scale[i] * y + jnp.matmul(
        sums, fixed.astype(dtype), precision=module.precision
    )
    if layer.bias is not None:
        y = y + shared.materialise(layer.bias, scales).astype(dtype)
    return y


def grouped_linear(
    embedding: jax.Array, kernel: jax.Array, bias: jax.Array, rows: Any, gradient_scale: Any = None
) -> jax.Array:
    """Chunks ``(..., N, C)`` from embeddings ``(..., N, D)`` (leading dims: dynamic samples):
    chunk ``k`` through the head ``g`` whose ``rows[g]`` hold it (``design.group_rows``),
    ``embedding[..., k, :] @ kernel[g] + bias[g]`` (``kernel (G, D, C)``, ``bias (G, C)``);
    ``gradient_scale[g]``: the multipliers of group ``g`` (``design.group_gradient_multipliers``:
    table, weight, bias; the table's are the embedding module's, :func:`row_factors`), ``None``:
    raw gradients."""
    out = jnp.zeros((*embedding.shape[:-1], kernel.shape[-1]), jnp.result_type(embedding, kernel))
    for g, r in enumerate(rows):
        mw, mb = (None, None) if gradient_scale is None else gradient_scale[g][1:]
        idx = np.asarray(r, np.int32)
        out = out.at[..., idx, :].set(
            scaled_dense(embedding[..., idx, :], kernel[g], bias[g], mw, mb)
        )
    return out


def row_factors(rows: Any, gradient_scale: Any) -> np.ndarray:
    """The table's per-row gradient multipliers ``(N, 1)`` of a grouped generator: row ``k``
    gets its group's table multiplier."""
    factors = np.empty((sum(len(r) for r in rows), 1), np.float32)
    for r, m in zip(rows, gradient_scale, strict=True):
        factors[list(r)] = m[0]
    return factors


#: Added to a tensor's mean square before the normalised decode's square root.
NORM_EPS = 1e-12


def unit_rms(piece: jax.Array) -> jax.Array:
    """``piece`` over its root mean square along the last axis (one tensor's raw values, per
    sample): the normalised decode of a grouped generator."""
    return piece * jax.lax.rsqrt(jnp.mean(piece * piece, axis=-1, keepdims=True) + NORM_EPS)


def normalized(raw: jax.Array, tensors: Any, flat_size: int) -> jax.Array:
    """Every tensor's slice of ``raw`` ``(..., flat_size)`` brought to unit RMS
    (:func:`unit_rms`); the gaps between tensors are zeros (their values are discarded)."""
    pieces = [unit_rms(raw[..., t.offset : t.offset + t.size]) for t in tensors]
    return concat_flat(pieces, [t.offset for t in tensors], flat_size)


def chunk_moments(
    table: jax.Array, kernel: jax.Array, bias: jax.Array, offset: int, size: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """For the values ``[offset, offset + size)`` of a linear generator's output (chunk ``k``:
    ``table[k] @ kernel + bias``), per chunk ``k`` they span: ``sum g0²``, ``sum g0 * bias``
    and ``sum bias²`` over the values of that chunk (``g0 = table[k] @ kernel``), each
    ``(chunks,)``, and the first chunk. The generator output is not formed: the sums of ``g0²``
    are ``table[k] G table[k]ᵀ`` with ``G`` the ``D x D`` Gram of the kernel's columns the chunk
    holds (at most three column ranges: the first chunk's, the last's, the whole)."""
    chunk_dim = bias.shape[0]
    first, last = offset // chunk_dim, (offset + size - 1) // chunk_dim
    ranges = []
    for k in range(first, last + 1):
        lo = offset - k * chunk_dim if k == first else 0
        hi = offset + size - k * chunk_dim if k == last else chunk_dim
        ranges.append((lo, hi))
    grams: dict = {}
    squares, crosses, biases = [], [], []
    for k, (lo, hi) in zip(range(first, last + 1), ranges, strict=True):
        if (lo, hi) not in grams:
            w, b = kernel[:, lo:hi], bias[lo:hi]
            grams[lo, hi] = (w @ w.T, w @ b, b @ b)
        gram, wb, bb = grams[lo, hi]
        squares.append(table[k] @ gram @ table[k])
        crosses.append(table[k] @ wb)
        biases.append(bb)
    return jnp.stack(squares), jnp.stack(crosses), jnp.stack(biases), first


def sample_mean_square(
    moments: tuple[jax.Array, jax.Array, jax.Array, int], scales: jax.Array, size: int
) -> jax.Array:
    """The mean square of one sample's values of a tensor (chunk ``k``: ``scales[k] * g0 +
    bias``), from :func:`chunk_moments`: ``sum_k (s_k² A_k + 2 s_k B_k + C_k) / size``."""
    squares, crosses, biases, first = moments
    s = scales[..., first : first + squares.shape[0]]
    return (s * s * squares + 2 * s * crosses + biases).sum(-1) / size


def read_checkpoint(path: str | Path) -> dict:
    """A nested dict of arrays saved with ``flax.serialization.msgpack_serialize`` (Linen: the
    variables or their ``params``; NNX: ``nnx.state(model).to_pure_dict()``)."""
    return serialization.msgpack_restore(Path(path).read_bytes())


def lookup(tree: Any, keys: tuple) -> Any:
    """The leaf of a nested dict at ``keys`` (int keys also as strings, as msgpack stores them);
    ``None`` when absent."""
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree[key] if key in tree else tree.get(str(key))
    return tree


def base_leaf(
    tree: Any, keys: tuple, shape: tuple, path: str, error: type[Exception] = ValueError
) -> jax.Array:
    """The base checkpoint's value at ``keys``, checked against the target's ``shape``."""
    value = lookup(tree, keys)
    if value is None or isinstance(value, dict):
        raise error(f"the base checkpoint has no {path!r}; save the target's own variables")
    if tuple(value.shape) != tuple(shape):
        raise error(
            f"the base checkpoint's {path!r} has shape {tuple(value.shape)}, the target's is "
            f"{tuple(shape)}; save the variables of this target"
        )
    return jnp.asarray(value)


def base_flat(
    params: Any,
    base: Any,
    tensors: Any,
    flat_size: int,
    collection: str | None = None,
    error: type[Exception] = ValueError,
) -> jax.Array:
    """``--generate delta``'s frozen base, one flat vector ``(flat_size,)``: the generated tensors
    of ``params`` (the target's own), or of ``base`` when given (a msgpack checkpoint path or a
    tree; Linen, ``collection="params"``: the variables or their ``params``; NNX:
    ``nnx.state(model).to_pure_dict()``), each checked against the layout's shape."""
    if base is None:
        return jax.lax.stop_gradient(flatten(params, tensors, flat_size, error))
    tree = read_checkpoint(base) if isinstance(base, (str, Path)) else base
    if collection is not None and collection in tree:
        tree = tree[collection]
    pieces = [base_leaf(tree, t.keys, t.shape, t.path, error).reshape(-1) for t in tensors]
    return concat_flat(pieces, [t.offset for t in tensors], flat_size)
