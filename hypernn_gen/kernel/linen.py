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
    Shared,
    check_batch,
    check_flat,
    check_params,
    decode,
    flatten,
    fused_output,
    is_array,
    merge_samples,
    model_mesh,
    per_sample,
    shared_inputs,
    split_chunks,
    squeeze_sample,
    unflatten,
)

__all__ = [
    "Shared",
    "apply_target",
    "check_batch",
    "check_flat",
    "check_layout",
    "decode",
    "excluded_params",
    "flatten",
    "fused_apply",
    "fused_path",
    "is_array",
    "merge_params",
    "model_mesh",
    "run_per_sample",
    "shared_inputs",
    "split_chunks",
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


def apply_target(
    apply: Callable, variables: dict, args: tuple, rngs: dict, mutable: list, kwargs: dict
) -> tuple[Any, dict]:
    """``apply(variables, *args, ...)`` (a target's ``apply``), returning ``(output, the updated
    mutable collections)``."""
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
) -> tuple[Any, dict]:
    """Sample ``b`` through the target alone (a batch of 1) with ``samples[b]``, batched with
    ``jax.vmap``: its weight set, or, with ``fused`` (:func:`fused_path`), its embedding scales.

    ``state`` holds the target's collections besides ``params``: each sample gets its own copy
    of the ``mutable`` ones (BatchNorm statistics) and its own rng keys, the frozen ones are
    shared. Returns the outputs and the mutable collections with the copies' mean written back.
    """
    batch = jax.tree.leaves(samples)[0].shape[0]
    positions = [i for i, x in enumerate(inputs) if is_array(x)]
    sample_rngs = {name: jax.random.split(key, batch) for name, key in rngs.items()}
    frozen = {col: value for col, value in state.items() if col not in mutable}
    copies = {col: jax.tree.map(lambda x: per_sample(x, batch), state[col]) for col in mutable}

    def one_sample(sample: Any, own: dict, keys: dict, xs: list) -> tuple[Any, dict]:
        args = list(inputs)
        for i, x in zip(positions, xs, strict=True):
            args[i] = x[None]
        p, apply = (sample, target.apply) if fused is None else fused(sample)
        variables = {**frozen, **own, "params": merge_params(p, excluded)}
        out, updates = apply_target(apply, variables, tuple(args), keys, mutable, kwargs)
        return squeeze_sample(out), updates

    arrays = [inputs[i] for i in positions]
    out, updates = jax.vmap(one_sample)(samples, copies, sample_rngs, arrays)
    return out, {col: jax.tree.map(merge_samples, state[col], updates[col]) for col in mutable}


def fused_apply(target: nn.Module, shared: Shared, stacks: tuple, scales: jax.Array) -> Callable:
    """``target.apply`` for one sample: its fused layers compute their output from the shared
    ``stacks`` and the sample's ``scales`` (``nn.intercept_methods``); all else runs as is."""
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
    tensors not fused, ``target.apply`` with the fused layers computing from shared weights)."""
    stacks = tuple(shared.stack(layer) for layer in shared.fused)

    def sample(scales: jax.Array) -> tuple[dict, Callable]:
        return shared.params(scales), fused_apply(target, shared, stacks, scales)

    return sample
