"""LoRA hypernetworks for Flax (Linen and NNX): the target-independent code both share.

The target stays frozen. For each adapted Dense/Linear layer ``j`` (an :class:`Adapter`; also
``DenseGeneral``/``LinearGeneral``, whose contracted input dims count as ``in`` and whose
features as ``out``) the hypernetwork generates ``A_j (rank, in)`` and ``B_j (out, rank)``, and
the layer computes ``W x + b + (alpha / rank) * B_j (A_j dropout(x))`` (PEFT's LoRA). Static mode
makes one adapter set; dynamic mode one per sample, computed with batched products (``einsum``
over the batch), never forming ``batch x out x in`` weights.

One shared generator makes every layer's adapter, as in the Torch kernel: the embedding of layer
``j`` for condition ``c`` is ``layer_norm(c + depth[d_j] + kind[k_j])`` and one pair of heads per
module type maps it to ``A_j`` and ``B_j`` (``shared=False``: every layer its own heads, from
``layer_norm(c)``). The ``B`` heads start at zero, so the hypernetwork starts exactly at the base
model; the ``A`` heads start at PEFT's scale for ``A`` (std ``1 / sqrt(3 * in)``).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Adapter(NamedTuple):
    """One adapted layer: its dotted path, its keys in the target, the size of its contracted
    input (``in_dims`` trailing input dims), its features, block index and module type."""

    path: str
    keys: tuple
    in_features: int
    out_shape: tuple[int, ...]
    in_dims: int
    depth: int
    kind: int


def out_features(adapter: Adapter) -> int:
    """The layer's output size: the product of its features."""
    return math.prod(adapter.out_shape)


def check_kernel(adapter: Adapter, shape: tuple, error: type[Exception] = ValueError) -> None:
    """Refuse a layer whose kernel shape ``(*in, *features)`` differs from the adapter's."""
    n = adapter.in_dims
    fits = tuple(shape[n:]) == tuple(adapter.out_shape) and math.prod(shape[:n]) == (
        adapter.in_features
    )
    if not fits:
        raise error(
            f"this target's layer {adapter.path!r} has kernel shape {tuple(shape)}, the adapters "
            f"were made for ({adapter.in_features}, {out_features(adapter)}); regenerate the "
            "file for the new target"
        )


def head_groups(adapters: Any, shared: bool) -> tuple[tuple[int, ...], ...]:
    """The adapters sharing one pair of heads: one group per module type (``shared``) or each
    layer alone, in order of first appearance."""
    groups = [a.kind if shared else j for j, a in enumerate(adapters)]
    return tuple(
        tuple(j for j, g in enumerate(groups) if g == group) for group in dict.fromkeys(groups)
    )


def a_head_std(in_features: int, width: int) -> float:
    """The ``A`` head's kernel std: unit-variance features give ``A`` PEFT's std
    ``1 / sqrt(3 * in)`` (of ``U(+-1/sqrt(in))``)."""
    return 1.0 / math.sqrt(3.0 * in_features * width)


def layer_embeddings(
    c: jax.Array, depth: jax.Array | None, kind: jax.Array | None, adapters: Any
) -> jax.Array:
    """``layer_norm(c + depth[d_j] + kind[k_j])`` for every adapter ``j`` (``depth`` None: no
    layer embeddings), ``(..., adapters, embedding_dim)``; the norm has no parameters."""
    e = jnp.broadcast_to(c[..., None, :], (*c.shape[:-1], len(adapters), c.shape[-1]))
    if depth is not None and kind is not None:
        e = e + depth[jnp.asarray([a.depth for a in adapters])]
        e = e + kind[jnp.asarray([a.kind for a in adapters])]
    mean = e.mean(-1, keepdims=True)
    var = jnp.square(e - mean).mean(-1, keepdims=True)
    return (e - mean) * jax.lax.rsqrt(var + 1e-5)


def split_adapters(
    adapters: Any, groups: Any, heads: list[tuple[jax.Array, jax.Array]], rank: int
) -> dict[str, jax.Array]:
    """The heads' outputs (one ``(a_all, b_all)`` per group, ``(..., members, size)``) as
    ``{path.lora_A: (..., rank, in), path.lora_B: (..., out, rank)}``, in adapter order."""
    out: dict[str, jax.Array] = {}
    for members, (a_all, b_all) in zip(groups, heads, strict=True):
        for i, j in enumerate(members):
            a = adapters[j]
            lead = a_all.shape[:-2]
            out[f"{a.path}.lora_A"] = a_all[..., i, :].reshape(*lead, rank, a.in_features)
            out[f"{a.path}.lora_B"] = b_all[..., i, :].reshape(*lead, out_features(a), rank)
    return {k: out[k] for a in adapters for k in (f"{a.path}.lora_A", f"{a.path}.lora_B")}


def condition_features(
    condition: Any, condition_shape: tuple, error: type[Exception] = ValueError
) -> jax.Array:
    """A dynamic condition ``(batch, *condition_shape)`` flattened to ``(batch, prod)``, float."""
    shape = tuple(getattr(condition, "shape", ()))
    if not shape:
        raise error("dynamic mode needs a condition: pass condition=... (or an input)")
    if math.prod(shape[1:]) != math.prod(condition_shape):
        raise error(
            f"the condition has shape {shape}, these adapters were made for "
            f"(batch, *{tuple(condition_shape)}); pass condition=..."
        )
    return jnp.asarray(condition).reshape(shape[0], -1).astype(jnp.float32)


def lora_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of the adapters' input (``key`` None: none, as in evaluation)."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_output(
    y: jax.Array,
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scaling: float,
    in_dims: int,
    error: type[Exception] = ValueError,
) -> jax.Array:
    """A layer's output ``y`` plus ``scaling * B (A x)``, with one adapter (``a (rank, in)``) or one
    per sample (``a (batch, rank, in)``: batched products, the batch first in ``x``)."""
    dtype = jnp.result_type(x, y)
    a, b = a.astype(dtype), b.astype(dtype)
    h = x.reshape(*x.shape[: x.ndim - in_dims], -1).astype(dtype)  # (..., in)
    if a.ndim == 2:
        u = (h @ a.T) @ b.T
    else:
        if h.ndim < 2 or h.shape[0] != a.shape[0]:
            raise error(
                f"{a.shape[0]} adapter sets but a LoRA layer got input {tuple(x.shape)}; in "
                "dynamic mode every adapted layer's input must carry the batch first"
            )
        h = h.reshape(a.shape[0], -1, h.shape[-1])  # (batch, tokens, in)
        u = jnp.einsum("btr,bor->bto", jnp.einsum("bti,bri->btr", h, a), b)
    return y + (scaling * u).reshape(y.shape).astype(y.dtype)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """The kernel ``(*in, *features)`` with one adapter merged in: ``W + scaling * (B A)^T``."""
    delta = (scaling * (b @ a)).T.reshape(kernel.shape)
    return kernel + delta.astype(kernel.dtype)


def merge_adapters(params: dict, adapters: Any, lora: dict, scaling: float) -> dict:
    """A copy of a target's parameter tree (nested dicts keyed by the adapters' ``keys``: Linen's
    ``params``, NNX's ``nnx.to_pure_dict``) with one adapter set merged into each adapted
    kernel: load it into the plain target to run it without the hypernetwork."""
    out = dict(params)
    for a in adapters:
        node = out
        for key in a.keys:
            node[key] = dict(node[key])
            node = node[key]
        a_, b_ = lora[f"{a.path}.lora_A"], lora[f"{a.path}.lora_B"]
        node["kernel"] = merged_kernel(jnp.asarray(node["kernel"]), a_, b_, scaling)
    return out
