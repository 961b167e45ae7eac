"""The Flax Linen kernel: layout check, excluded parameters, running the target (one weight set
or one per sample, vmapped) and the fused layers' interception.

As in :mod:`hypernn_gen.kernel.flax`, the layout comes in as arguments: ``tensors`` (the
generated tensors: ``keys``, ``shape``, ...), ``excluded`` (``(keys, shape)`` of the trainable
parameters not generated).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from .flax import (
    SAMPLE_AXIS,
    Shared,
    base_flat,
    check_batch,
    check_digest,
    check_flat,
    check_params,
    check_sample_reduction,
    decode,
    digest_array,
    flatten,
    fused_output,
    is_array,
    merge_samples,
    model_mesh,
    per_sample,
    sample_axes,
    scale_grad,
    scaled_dense,
    shared_inputs,
    split_call,
    split_chunks,
    squeeze_sample,
    static_inputs,
    unflatten,
)

__all__ = [
    "base_flat",
    "ScaledDense",
    "Shared",
    "apply_target",
    "carry_digest",
    "batch_norm_axes",
    "check_batch",
    "check_digest",
    "check_flat",
    "check_layout",
    "decode",
    "digest_array",
    "excluded_params",
    "flatten",
    "fused_apply",
    "fused_path",
    "is_array",
    "merge_params",
    "model_mesh",
    "run_per_sample",
    "scale_grad",
    "shared_inputs",
    "split_chunks",
    "static_inputs",
    "unflatten",
]


def check_layout(
    target_network: nn.Module,
    inputs: tuple,
    kwargs: dict[str, Any],
    rng_names: list[str],
    tensors: Any,
    excluded: Any = (),
) -> None:
    """Refuse a target whose ``params`` differ from the generated layout (shapes only: the
    target's init is traced, not run)."""
    rngs = {name: jax.random.key(0) for name in ("params", "dropout", *rng_names)}
    shapes = jax.eval_shape(lambda: nn.meta.unbox(target_network.init(rngs, *inputs, **kwargs)))
    found = {
        tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get("params", {}))[0]
    }
    expected = {p.keys: p.shape for p in tensors}
    expected.update(excluded)
    check_params(found, expected, "regenerate the file for the new target and inputs")


def carry_digest(module: nn.Module, digest: str, error: type[Exception] = ValueError) -> None:
    """The checkpoint digest as the variable ``("layout", "digest")`` (8 bytes): made at init,
    checked at every apply whose variables have it (``check_digest``); variables without a
    ``"layout"`` collection (saved before digests existed) apply as before."""
    if module.is_initializing():
        module.variable("layout", "digest", digest_array, digest)
    elif module.has_variable("layout", "digest"):
        check_digest(module.get_variable("layout", "digest"), digest, error)


def merge_params(generated: dict[str, Any], excluded: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two ``params`` trees with disjoint leaves."""
    out = dict(generated)
    for key, value in excluded.items():
        out[key] = (
            merge_params(out[key], value) if isinstance(value, dict) and key in out else value
        )
    return out


def excluded_params(params: dict[str, Any], excluded: Any) -> dict[str, Any]:
    """The ``excluded`` leaves (``(keys, shape)`` pairs) of a target's ``params`` tree."""
    out: dict[str, Any] = {}
    for keys, _ in excluded:
        node, leaf = out, params
        for key in keys[:-1]:
            node, leaf = node.setdefault(key, {}), leaf[key]
        node[keys[-1]] = leaf[keys[-1]]
    return out


def batch_norm_axes(initializing: bool, stats: str | None = None) -> Callable:
    """An ``nn.intercept_methods`` interceptor that sets the ``axis_name`` of the target's
    ``nn.BatchNorm`` layers (exact type) for one run: while the hypernetwork initialises, the
    devices' axes are dropped (Flax's own init skips them too, so init works outside ``pmap``);
    per sample (``stats``: dynamic mode, ``"batch"`` or ``"sample"``), :func:`sample_axes`."""

    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        m = context.module
        if context.method_name != "__call__" or type(m) is not nn.BatchNorm:
            return next_fun(*args, **kwargs)
        running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        running = m.use_running_average if running is None else running
        if running or (stats in (None, "sample") and not (initializing and m.axis_name)):
            return next_fun(*args, **kwargs)
        if stats == "batch":
            check_sample_reduction(args[0], f"BatchNorm {'/'.join(m.path)}")
        if stats == "batch" and kwargs.get("mask") is not None:
            raise ValueError(
                f"BatchNorm {'/'.join(m.path)} is called with a mask: its statistics over the "
                "whole batch cannot be made from the samples' own (their masked sizes differ); "
                "generate with --batch-norm-stats sample"
            )
        axes = None if initializing else m.axis_name
        axes = axes if stats is None else sample_axes(axes, m.axis_index_groups, stats)
        saved = m.axis_name
        object.__setattr__(m, "axis_name", axes)  # a frozen dataclass field, read by __call__
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(m, "axis_name", saved)

    return intercept


def apply_target(
    apply: Callable,
    variables: dict,
    args: tuple,
    rngs: dict,
    mutable: list,
    kwargs: dict,
    initializing: bool = False,
    stats: str | None = None,
) -> tuple[Any, dict]:
    """``apply(variables, *args, ...)`` (a target's ``apply``), returning ``(output, the updated
    mutable collections)``; its BatchNorm layers' axes set by :func:`batch_norm_axes`."""
    with nn.intercept_methods(batch_norm_axes(initializing, stats)):
        if not mutable:
            return apply(variables, *args, rngs=rngs, **kwargs), {}
        out, updates = apply(variables, *args, rngs=rngs, mutable=mutable, **kwargs)
    return out, {col: updates[col] for col in mutable}


def run_per_sample(
    target: nn.Module,
    samples: Any,
    state: dict,
    mutable: list,
    excluded: dict,
    rngs: dict,
    inputs: tuple,
    kwargs: dict,
    fused: Callable | None = None,
    initializing: bool = False,
    stats: str = "batch",
) -> tuple[Any, dict]:
    """Sample ``b`` through the target alone (a batch of 1) with ``samples[b]``, batched with
    ``jax.vmap`` over ``SAMPLE_AXIS``: its weight set, or, with ``fused`` (:func:`fused_path`),
    its embedding scales.

    The call is split per sample by ``split_call`` (arrays by row, a PRNG key into one key per
    sample). ``state`` holds the target's collections besides ``params``: each sample gets its
    own copy of the ``mutable`` ones and its own rng keys, the frozen ones are shared; BatchNorm
    in training mode normalises by ``stats`` (``"batch"`` or ``"sample"``). Returns the outputs
    and the mutable collections with the copies' mean written back.
    """
    batch = jax.tree.leaves(samples)[0].shape[0]
    parts, sample_call = split_call(inputs, kwargs, batch)
    sample_rngs = {name: jax.random.split(key, batch) for name, key in rngs.items()}
    frozen = {col: value for col, value in state.items() if col not in mutable}
    copies = {col: jax.tree.map(lambda x: per_sample(x, batch), state[col]) for col in mutable}

    def one_sample(sample: Any, own: dict, keys: dict, xs: list) -> tuple[Any, dict]:
        args, sample_kwargs = sample_call(xs)
        p, apply = (sample, target.apply) if fused is None else fused(sample)
        variables = {**frozen, **own, "params": merge_params(p, excluded)}
        out, updates = apply_target(
            apply, variables, tuple(args), keys, mutable, sample_kwargs, initializing, stats
        )
        return squeeze_sample(out), updates

    vmapped = jax.vmap(one_sample, axis_name=SAMPLE_AXIS)
    out, updates = vmapped(samples, copies, sample_rngs, parts)
    return out, {col: jax.tree.map(merge_samples, state[col], updates[col]) for col in mutable}


def fused_apply(target: nn.Module, shared: Shared, stacks: tuple, scales: jax.Array) -> Callable:
    """``target.apply`` for one sample: its fused layers compute their output from the shared
    ``stacks`` and the sample's ``scales`` (``nn.intercept_methods``); all else runs as is.
    """
    found = {layer.path: (layer, stack) for layer, stack in zip(shared.fused, stacks, strict=True)}

    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        fusible = context.method_name == "__call__" and type(module) in (nn.Dense, nn.Conv)
        if not fusible or module.path not in found:
            return next_fun(*args, **kwargs)
        layer, stack = found[module.path]
        conv = isinstance(module, nn.Conv)
        return fused_output(layer, stack, shared, scales, module, *args, **kwargs, conv=conv)

    def apply(*args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(intercept):
            return target.apply(*args, **kwargs)

    return apply


def fused_path(target: nn.Module, shared: Shared) -> Callable:
    """The fused path's step for :func:`run_per_sample`: a sample's embedding scales -> (its
    tensors not fused, ``target.apply`` with the fused layers computing from shared weights).
    """
    stacks = tuple(shared.stack(layer) for layer in shared.fused)

    def sample(scales: jax.Array) -> tuple[dict, Callable]:
        return shared.params(scales), fused_apply(target, shared, stacks, scales)

    return sample


class ScaledDense(nn.Module):
    """``nn.Dense`` (the same ``kernel`` and ``bias``, the same init) whose gradients are
    multiplied by ``gradient_scale``: ``(kernel's, bias's)`` multipliers, ``None``: raw."""

    features: int
    gradient_scale: tuple = (None, None)
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return scaled_dense(x, kernel, bias, *self.gradient_scale)
