"""The Flax kernel, shared by Linen and NNX: decoding, flat vector <-> tree, checks, batching, mesh.

Every function takes the layout it works on as arguments (``tensors``: a sequence of objects with
``keys``, ``shape``, ``offset``, ``size`` and ``dtype``; ``flat_size``; ``chunk_dim``), so the
runtime (a :class:`~hypernn_gen.layout.Layout`) and a generated file (its ``GENERATED`` table)
call the same code. ``error`` is the exception class a check raises (generated files:
``ValueError``; the runtime: ``HyperNetworkError``, a ``ValueError`` too).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def decode(
    raw: jax.Array, scale: jax.Array, shift: jax.Array, tensors: Any, flat_size: int
) -> jax.Array:
    """``shift[t] + scale[t] * raw[slice of t]`` for every generated tensor ``t``.

    ``raw`` is ``(..., flat_size)``; ``scale``/``shift`` are ``(len(tensors),)``. One slice per
    tensor: XLA would constant-fold a repeated ``(flat_size,)`` scale table at compile time.
    """
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


def sample_batch_norms(modules: Any, norm_type: Any) -> None:
    """NNX BatchNorm layers (exactly ``norm_type``, among ``nnx.iter_modules(...)``) of a
    per-sample module that average their statistics over devices (``axis_name``) average over
    the samples (``SAMPLE_AXIS``) too: the plain target's batch statistics, not one sample's
    averaged over devices."""
    for _, m in modules:
        if type(m) is norm_type and m.axis_name is not None:
            m.axis_name = with_sample_axis(m.axis_name, m.axis_index_groups)


def batch_norm_axes(norm_type: Any, per_sample: bool, initializing: bool) -> Any:
    """An ``nn.intercept_methods`` interceptor for Linen BatchNorm layers (exactly ``norm_type``)
    with an ``axis_name``: while the hypernetwork initialises, none (Flax's own init skips
    it too, so init works outside ``pmap``); per sample (dynamic mode), ``SAMPLE_AXIS`` first
    (statistics over samples and devices, as the plain target's over its batch)."""

    def intercept(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        m = context.module
        if context.method_name != "__call__" or type(m) is not norm_type or not m.axis_name:
            return next_fun(*args, **kwargs)
        saved = m.axis_name
        axes = with_sample_axis(saved, m.axis_index_groups)
        axes = (
            (axes[:1] if per_sample else None) if initializing else axes[0 if per_sample else 1 :]
        )
        object.__setattr__(m, "axis_name", axes)  # a frozen dataclass field, read by __call__
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(m, "axis_name", saved)

    return intercept


#: The ``jax.vmap`` axis of a dynamic hypernetwork's samples.
SAMPLE_AXIS = "hypernn_samples"


def with_sample_axis(axis_name: Any, groups: Any, error: type[Exception] = ValueError) -> tuple:
    """``axis_name`` with ``SAMPLE_AXIS`` first: BatchNorm statistics over samples and devices."""
    if groups is not None:
        raise error(
            "a BatchNorm with axis_index_groups cannot run per sample in dynamic mode (its "
            "groups name devices, not samples); drop axis_index_groups or use static mode"
        )
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return (SAMPLE_AXIS, *names)


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
