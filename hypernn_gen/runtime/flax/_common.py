"""Pieces shared by the Linen and NNX hypernetworks: decoding, flat <-> tree, checks, batching.

Everything here is a plain function of a :class:`~hypernn_gen.layout.Layout` and arrays, so it
works the same under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ...design import (
    GRADIENT_SCALINGS,
    group_gradient_multipliers,
    group_rows,
    layout_gradient_multipliers,
)
from ...errors import HyperNetworkError, TraceError
from ...kernel import flax as fk
from ...layout import Chunking, Layout

__all__ = ["flatten_params", "unflatten_params"]


class TargetHyperNetworkError(HyperNetworkError, TraceError):
    """The target cannot be traced (no float parameters, integer params, ...).

    Both a :class:`HyperNetworkError` (the runtime got a bad target) and a :class:`TraceError`
    (what the tracer raised), so either ``except`` clause catches it.
    """


def traced(trace: Callable[[], Layout]) -> Layout:
    """Run a tracer, re-raising its :class:`TraceError` as :class:`TargetHyperNetworkError`."""
    try:
        return trace()
    except TargetHyperNetworkError:
        raise
    except TraceError as exc:
        raise TargetHyperNetworkError(str(exc)) from exc


# -- flat vector <-> parameter tree --------------------------------------------------------------


def unflatten_params(layout: Layout, flat: jax.Array) -> dict:
    """The generated tensors as a nested dict keyed like the target (``params`` tree for Linen,
    the ``nnx.state`` path for NNX), from ``flat`` of shape ``(..., flat_size)``.

    Leading batch dims are kept: ``(B, flat_size)`` gives leaves ``(B, *shape)``. Each leaf is cast
    to the dtype the target declares. Compiled once per layout and shape (the layout is static).
    """
    return _unflatten(layout, jnp.asarray(flat))


@functools.partial(jax.jit, static_argnums=0)
def _unflatten(layout: Layout, flat: jax.Array) -> dict:
    return fk.unflatten(flat, layout.generated)


def flatten_params(layout: Layout, params: Any) -> jax.Array:
    """The flat vector ``(..., flat_size)`` for a tree holding the generated tensors.

    ``params`` is a Linen ``params`` dict, an ``nnx.State``/pure dict, or anything indexable by
    the layout's keys; leaves may be ``nnx.Variable``. Extra entries are ignored; leading batch
    dims (the same on every leaf) are kept. The inverse of :func:`unflatten_params`.
    """
    return fk.flatten(params, layout.generated, layout.flat_size, HyperNetworkError)


def concat_flat(layout: Layout, pieces: list[jax.Array]) -> jax.Array:
    """One piece per generated tensor, concatenated into ``(..., flat_size)`` with zeros in the
    padding between tensors (``chunking="tensor"``)."""
    return fk.concat_flat(pieces, [t.offset for t in layout.generated], layout.flat_size)


get_path = fk.get_path


# -- decoding -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def decode(
    layout: Layout,
    raw: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    gradient_scale: tuple[float, float, float] | None = None,
) -> jax.Array:
    """``shift[t] + scale[t] * raw[slice of t]`` for every generated tensor (the kernel's);
    ``gradient_scale``: the multipliers (:func:`gradient_scale`), ``None``: raw gradients."""
    return fk.decode(raw, scale, shift, layout.generated, layout.flat_size, gradient_scale)


def gradient_scale(
    layout: Layout, chunking: Chunking, embedding_dim: int, scaling: str
) -> tuple[float, float, float] | None:
    """The multipliers of the table, the linear generator's weight and bias for ``scaling``
    (``"on"``/``"off"``: ``None``), the generated files' ``GRADIENT_SCALE``."""
    if scaling not in GRADIENT_SCALINGS:
        raise HyperNetworkError(f"gradient_scaling must be 'on' or 'off', got {scaling!r}")
    return layout_gradient_multipliers(layout, chunking, embedding_dim, scaling)


#: ``"one"``: one linear generator for every chunk; ``"std"``: one head per group of tensors of
#: similar init std, each tensor's raw values normalised (hypernn_gen.design.std_groups)
GENERATOR_GROUPS = ("one", "std")


def generator_groups(
    groups: str,
    layout: Layout,
    chunking: Chunking,
    embedding_dim: int,
    scaling: str,
    constructor: Any,
    hidden: tuple,
    generate: str,
) -> tuple[tuple, tuple | None] | None:
    """``generator_groups="std"``: the chunks of every group (``design.group_rows``) and their
    multipliers (``design.group_gradient_multipliers``; ``None`` with ``gradient_scaling="off"``);
    ``None`` for ``"one"`` (the Torch runtime's rules)."""
    if groups not in GENERATOR_GROUPS:
        raise HyperNetworkError(f"generator_groups must be 'one' or 'std', got {groups!r}")
    if groups == "one":
        return None
    if constructor is not None or hidden or generate != "weights":
        raise HyperNetworkError(
            'generator_groups="std" builds its own linear heads: drop '
            "weight_generator_constructor, generator_hidden and generate"
        )
    if any(t.offset % chunking.chunk_dim for t in layout.generated):
        raise HyperNetworkError(
            'generator_groups="std" needs every tensor on its own chunks: pass '
            'chunking="tensor" (the default "auto" is, without num_embeddings/chunk_dim)'
        )
    rows = group_rows(layout, chunking)
    scale = None
    if scaling == "on":
        scale = group_gradient_multipliers(layout, chunking, embedding_dim)
    return rows, scale


def table_scale(scale: Any) -> Any:
    """An embedding module's ``gradient_scale`` for ``scale_grad``: one number, ``None``, or
    per row (a grouped generator's, kept as a tuple: NNX attributes must be hashable) as
    ``(num_embeddings, 1)``."""
    return np.asarray(scale, np.float32)[:, None] if isinstance(scale, tuple) else scale


def check_generate(generate: str, base: Any, generator_constructor: Any) -> bool:
    """Check ``generate``/``base`` (the Torch runtime's rules); ``True`` for ``"delta"``."""
    if generate == "lora":
        raise HyperNetworkError(
            'generate="lora" has its own classes for Flax: use FlaxLoRAHyperNetwork or '
            "NNXLoRAHyperNetwork (hypernn_gen.runtime.flax.lora)"
        )
    if generate not in ("weights", "delta"):
        raise HyperNetworkError(f"generate must be 'weights' or 'delta', got {generate!r}")
    if base is not None and generate != "delta":
        raise HyperNetworkError('base= applies to generate="delta" only')
    if generate == "delta" and generator_constructor is not None:
        raise HyperNetworkError(
            'generate="delta" starts every delta at exactly 0 by zeroing the default weight '
            "generator's output layer; drop weight_generator_constructor"
        )
    if isinstance(base, str | Path) and not Path(base).is_file():
        raise HyperNetworkError(
            f"base checkpoint {str(base)!r} is not a file; pass the path of a msgpack file "
            "(flax.serialization.msgpack_serialize of the target's variables)"
        )
    return generate == "delta"


def condition_dim(shape: tuple[int, ...] | None, dim: int | None) -> int | None:
    """The flattened condition size from ``condition_shape`` or ``condition_dim``."""
    return math.prod(shape) if shape is not None else dim


def raw_vector(
    layout: Layout, raw: Any, batch: int | None, num_embeddings: int, hidden_dim: int, emb: str
) -> jax.Array:
    """Check the weight generator's output and cut it to ``(flat_size,)``/``(batch, flat_size)``.

    ``emb`` describes the expected embedding shape for the error message.
    """
    if not isinstance(raw, jax.Array | np.ndarray):
        raise HyperNetworkError(
            f"the weight generator returned {type(raw).__name__}, expected an array of chunks "
            f"(..., {num_embeddings}, {hidden_dim})"
        )
    if batch is not None:
        if raw.ndim == 0 or raw.shape[0] != batch:
            raise HyperNetworkError(
                f"the weight generator returned shape {tuple(raw.shape)}, which does not split "
                f"into {batch} samples; keep the batch dimension first"
            )
        raw = raw.reshape(batch, -1)
    else:
        raw = raw.reshape(-1)
    if raw.shape[-1] < layout.flat_size:
        raise HyperNetworkError(
            f"the weight generator made {raw.shape[-1]} values per weight set, the target needs "
            f"{layout.flat_size}: return (num_embeddings={num_embeddings}, "
            f"hidden_dim={hidden_dim}) chunks from an embedding of shape {emb}"
        )
    return raw[..., : layout.flat_size]


def check_embedding(embedding: Any, batch: int | None, num_embeddings: int, dim: int) -> None:
    """The embedding must be an array ``(num_embeddings, dim)``/``(batch, num_embeddings, dim)``."""
    expected = (num_embeddings, dim) if batch is None else (batch, num_embeddings, dim)
    if not isinstance(embedding, jax.Array | np.ndarray):
        raise HyperNetworkError(
            f"the embedding module returned {type(embedding).__name__}, expected an array of "
            f"shape {expected}"
        )
    bad_batch = batch is not None and (embedding.ndim == 0 or embedding.shape[0] != batch)
    if embedding.ndim == 0 or embedding.shape[-1] != dim or bad_batch:
        raise HyperNetworkError(
            f"the embedding module returned shape {tuple(embedding.shape)}, expected {expected}: "
            f"embedding_dim={dim} last" + (", the batch first" if batch is not None else "")
        )


def check_flat(layout: Layout, flat: Any, mode: str) -> None:
    """``generated_params`` must be ``(flat_size,)`` (static) or ``(batch, flat_size)``."""
    fk.check_flat(flat, layout.flat_size, mode == "dynamic", HyperNetworkError)


# -- sharding the weight generator's output ------------------------------------------------------


MODEL_AXIS_HIDDEN = (
    "model_axis with generator_hidden is not supported by the runtime library (generated files "
    "support it); use a linear generator here, or generate the file with --generator-hidden"
)
MODEL_AXIS_CUSTOM = (
    "model_axis splits the default weight generator only; with weight_generator_constructor, "
    "annotate your generator's parameters yourself (with_partitioning) and pass model_axis=None"
)


def model_mesh(model_axis: str, chunk_dim: int) -> Any:
    """The mesh set with ``jax.set_mesh``, checked for ``model_axis`` (the kernel's)."""
    return fk.model_mesh(model_axis, chunk_dim, HyperNetworkError)


split_chunks = fk.split_chunks


# -- dynamic mode -------------------------------------------------------------------------------


is_array = fk.is_array
per_sample = fk.per_sample
merge_samples = fk.merge_samples
squeeze = fk.squeeze_sample


def first_array(args: tuple) -> Any:
    return next((a for a in args if is_array(a)), None)


def check_batch(args: tuple, batch: int) -> None:
    """Every positional array input must have the leading batch dimension ``batch``."""
    fk.check_batch(args, batch, HyperNetworkError)


def check_batch_norm_stats(stats: str) -> None:
    if stats not in fk.BATCH_NORM_STATS:
        raise HyperNetworkError(
            f"batch_norm_stats must be one of {', '.join(map(repr, fk.BATCH_NORM_STATS))}, "
            f"got {stats!r}"
        )


def condition_batch(condition: Any) -> int:
    if not is_array(condition) or condition.ndim == 0:
        raise HyperNetworkError(
            "dynamic mode needs a conditioning input with a leading batch dimension: pass the "
            "target's inputs or condition=..."
        )
    return int(condition.shape[0])


def unsqueeze(x: Any) -> Any:
    return x[None] if is_array(x) else x
