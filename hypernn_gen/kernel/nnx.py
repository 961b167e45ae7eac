"""The Flax NNX kernel: the target's copy with empty slots for the generated Params, layout
check, running the target (one weight set or one per sample, vmapped) and the fused layers.

As in :mod:`hypernn_gen.kernel.flax`, the layout comes in as arguments: ``tensors`` (the
generated tensors: ``keys``, ``shape``, ...), ``excluded`` (``(keys, shape)`` of the trainable
parameters not generated).
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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
    "FUSION",
    "FusedConv",
    "FusedLinear",
    "GeneratedSlot",
    "SamplesBatchNorm",
    "ScaledLinear",
    "Shared",
    "as_params",
    "check_batch",
    "check_digest",
    "check_flat",
    "check_layout",
    "decode",
    "digest_array",
    "flatten",
    "fused_layers",
    "fused_path",
    "install_fusion",
    "is_array",
    "model_mesh",
    "run_per_sample",
    "run_target",
    "scale_grad",
    "shared_inputs",
    "split_chunks",
    "static_inputs",
    "unflatten",
    "without_generated",
]


class GeneratedSlot(nnx.Variable):
    """Where a generated ``nnx.Param`` sits in the hypernetwork's copy of the target: an empty
    ``(0,)`` array of the parameter's dtype; the values come from the weight generator."""


def check_layout(target_network: nnx.Module, tensors: Any, excluded: Any = ()) -> None:
    """Refuse a target whose ``nnx.Param`` variables differ from the generated layout."""
    found = {
        tuple(path): tuple(var.get_value().shape)
        for path, var in nnx.to_flat_state(nnx.state(target_network, nnx.Param))
    }
    expected = {p.keys: p.shape for p in tensors}
    expected.update(excluded)
    check_params(found, expected, "regenerate the file for the new target")


def without_generated(target_network: nnx.Module, tensors: Any) -> nnx.Module:
    """A copy of the target whose generated Params are empty :class:`GeneratedSlot` placeholders.

    Its other variables are copied (new Variable objects sharing the immutable arrays), so the
    copy neither holds a second set of weights nor shares state with ``target_network``.
    """
    generated = {p.keys for p in tensors}
    graphdef, state = nnx.split(target_network)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if tuple(path) in generated:
            flat.append((path, GeneratedSlot(jnp.zeros((0,), var.get_value().dtype))))
        else:
            flat.append((path, var.copy()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def as_params(slots: nnx.State, params: dict[Any, Any]) -> nnx.State:
    """A State of ``nnx.Param`` at the slots' paths, with values from the ``params`` tree; a
    slot ``params`` has no value for stays empty (a fused layer's: it computes from shared
    weights)."""
    flat = []
    for path, slot in nnx.to_flat_state(slots):
        value = params
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        flat.append((path, slot if value is None else nnx.Param(value)))
    return nnx.from_flat_state(flat)


def run_target(target: nnx.Module, params: dict[Any, Any], inputs: tuple, kwargs: dict) -> Any:
    """The target (a :func:`without_generated` copy) with one weight set ``params``; its updated
    state (BatchNorm statistics, rng counts) is kept."""
    graphdef, slots, rest = nnx.split(target, GeneratedSlot, ...)
    module = nnx.merge(graphdef, as_params(slots, params), rest)
    out = module(*inputs, **kwargs)
    nnx.update(target, nnx.state(module, nnx.Not(nnx.Param)))
    return out


def run_per_sample(
    target: nnx.Module,
    samples: Any,
    inputs: tuple,
    kwargs: dict,
    fused: Callable | None = None,
    stats: str = "batch",
) -> Any:
    """Sample ``b`` through the target alone (a batch of 1) with ``samples[b]``, batched with
    ``jax.vmap`` over ``SAMPLE_AXIS``: its weight set, or, with ``fused`` (:func:`fused_path`),
    its embedding scales.

    The call is split per sample by ``split_call`` (arrays by row, a PRNG key and an
    ``nnx.Rngs`` into keys of each sample's own). Each sample gets its own copy of the target's
    state (Dropout its own key); BatchNorm in training mode normalises by ``stats``
    (``"batch"``: over the whole batch; ``"sample"``: alone); the copies' mean is written back
    afterwards.
    """
    batch = jax.tree.leaves(samples)[0].shape[0]
    graphdef, slots, fixed, rest = nnx.split(target, GeneratedSlot, nnx.Param, ...)
    copies = jax.tree.map(lambda x: per_sample(x, batch), rest)
    parts, sample_call = split_call(inputs, kwargs, batch, nnx.Rngs)

    def one_sample(sample: Any, fixed: nnx.State, own: nnx.State, xs: list) -> tuple[Any, Any]:
        args, sample_kwargs = sample_call(xs)
        params, layers = (sample, contextlib.nullcontext()) if fused is None else fused(sample)
        module = nnx.merge(graphdef, as_params(slots, params), fixed, own)
        for path, m in nnx.iter_modules(module):  # this sample's copy: its BatchNorm axes
            if type(m) is nnx.BatchNorm:
                m.axis_name = sample_axes(m.axis_name, m.axis_index_groups, stats)
                where = f"BatchNorm {'.'.join(map(str, path))}"
                if stats == "batch":
                    m.__class__ = SamplesBatchNorm
                    m.where = where
                if stats == "batch" and m.use_running_average is not True and xs:
                    check_sample_reduction(jax.tree.leaves(xs)[0], where)
        with layers:
            out = module(*args, **sample_kwargs)
        return squeeze_sample(out), nnx.state(module, nnx.Not(nnx.Any(nnx.Param, GeneratedSlot)))

    vmapped = jax.vmap(one_sample, in_axes=(0, None, 0, 0), axis_name=SAMPLE_AXIS)
    out, updated = vmapped(samples, fixed, copies, parts)
    nnx.update(target, jax.tree.map(merge_samples, rest, updated))
    return out


class SamplesBatchNorm(nnx.BatchNorm):
    """One sample's ``nnx.BatchNorm`` whose statistics span the samples (``stats="batch"``). It
    refuses ``mask=`` in training: Flax would average the samples' own masked means, not take
    the masked mean over the whole batch that the plain target takes (masked sizes differ)."""

    where: str  # "BatchNorm <path>", for the message

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        if mask is not None and running is not None and not running:
            raise ValueError(
                f"{self.where} is called with a mask: its statistics over the whole batch "
                "cannot be made from the samples' own (their masked sizes differ); generate "
                "with --batch-norm-stats sample"
            )
        return super().__call__(x, use_running_average, mask=mask)


# While a fused forward runs: (module, input) -> output of the fused layers, for one sample.
FUSION: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("fusion", default=None)


@contextlib.contextmanager
def fused_layers(shared: Shared, stacks: tuple, scales: jax.Array) -> Iterator[None]:
    """While active, the fused layers compute one sample's output from the shared ``stacks`` and
    the sample's ``scales``."""

    def call(module: Any, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        i = module.fused_index
        if out_sharding is not None:
            raise ValueError(
                f"out_sharding={out_sharding!r} on the fused layer "
                f"{'.'.join(map(str, shared.fused[i].path))}: a fused layer computes one sample "
                "at a time and cannot place its output; call the "
                "hypernetwork with return_params=True (materialising path) or drop out_sharding"
            )
        conv = isinstance(module, nnx.Conv)
        return fused_output(shared.fused[i], stacks[i], shared, scales, module, x, conv)

    token = FUSION.set(call)
    try:
        yield
    finally:
        FUSION.reset(token)


class FusedLinear(nnx.Linear):
    """``nnx.Linear`` that computes from shared weights while ``fused_layers`` is active."""

    fused_index: int  # its entry in the fused layers

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        call = FUSION.get()
        if call is None:
            return super().__call__(inputs, out_sharding=out_sharding)
        return call(self, inputs, out_sharding)


class FusedConv(nnx.Conv):
    """``nnx.Conv`` that computes from shared weights while ``fused_layers`` is active."""

    fused_index: int  # its entry in the fused layers

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        call = FUSION.get()
        if call is None:
            return super().__call__(inputs, out_sharding=out_sharding)
        return call(self, inputs, out_sharding)


def install_fusion(target: nnx.Module, fused: Any) -> None:
    """Turn the target's fused layers (``(path, kernel, bias, segments)`` tuples) into
    ``FusedLinear``/``FusedConv`` (same variables)."""
    modules = dict(nnx.iter_modules(target))
    for i, (path, *_) in enumerate(fused):
        module = modules[path]
        module.__class__ = FusedLinear if isinstance(module, nnx.Linear) else FusedConv
        module.fused_index = i


def fused_path(shared: Shared) -> Callable:
    """The fused path's step for :func:`run_per_sample`: a sample's embedding scales -> (its
    tensors not fused, a context in which the fused layers compute from shared weights)."""
    stacks = tuple(shared.stack(layer) for layer in shared.fused)

    def sample(scales: jax.Array) -> tuple[dict, Any]:
        return shared.params(scales), fused_layers(shared, stacks, scales)

    return sample


class ScaledLinear(nnx.Linear):
    """``nnx.Linear`` (the same variables) whose gradients are multiplied by ``gradient_scale``:
    ``(kernel's, bias's)`` multipliers, ``None``: raw (set after construction)."""

    gradient_scale: tuple = (None, None)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel, bias = self.kernel[...], self.bias[...]
        return scaled_dense(inputs, kernel, bias, *self.gradient_scale)
