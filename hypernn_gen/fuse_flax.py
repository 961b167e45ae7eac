"""Plan the fused dynamic path of generated Flax (Linen and NNX) hypernetworks.

The algebra is :mod:`hypernn_gen.fuse`'s, read along the other axis: a Flax kernel is
``(in, out)`` (Conv: ``(*window, in, out)``), so its flat values run along the *output* axis and
the contiguous "row" ``r`` is one input feature (Conv: one input feature at one window
position), ``out`` values that span the chunks ``first(r) .. first(r) + S - 1``. The per-sample
scale then multiplies the layer's *input*:

    y_b = sum_r x_b[r] W_b[r, :] = [x_b * s_b[first + 0], ..., x_b * s_b[first + S - 1], x_b] @ STACK

where ``STACK = [M_0; ...; M_{S-1}; BG]`` (``(S + 1) * rows`` by ``out``) is shared by every
sample: one GEMM per layer (Conv: on the input's patches, ``lax.conv_general_dilated_patches``).
Sample by sample, under ``jax.vmap``, the shared stack stays unbatched, so XLA runs one GEMM for
the whole batch. Everything else runs exactly as on the materialising path (the same vmap, rngs
and state copies), with its own generated tensors materialised per sample.

A layer is fused when it is exactly ``nn.Dense``/``nn.Conv`` (Linen) or ``nnx.Linear``/
``nnx.Conv`` (NNX), owns exactly its generated kernel (and generated bias, if it has one), uses
the default ``dot_general``/``conv_general_dilated``, is an ungrouped, unmasked convolution with
``SAME``/``VALID``/explicit padding, and no kernel row spans more than
:data:`~hypernn_gen.fuse.MAX_SEGMENTS` chunks. A weight generator that is not linear fuses
nothing (``linear_generator=False``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .fuse import MAX_SEGMENTS, NONLINEAR_GENERATOR, FusedLayer, FusionPlan, segments
from .layout import Chunking, Layout

__all__ = ["plan_linen_fusion", "plan_nnx_fusion"]

#: A module as the planner sees it: (type name, fused kind or None, why not fusible or None,
#: the kernel shape the layer expects or None when unknown).
Record = tuple[str, str | None, str | None, tuple[int, ...] | None]


def plan_linen_fusion(
    module: Any,
    example_inputs: tuple,
    layout: Layout,
    chunking: Chunking,
    *,
    linear_generator: bool = True,
    kwargs: dict[str, Any] | None = None,
) -> FusionPlan:
    """The fusion plan of a Linen target: its submodules are recorded while its init is traced
    (``jax.eval_shape``, no parameter memory) on ``example_inputs`` and keywords ``kwargs``."""
    import flax.linen as nn
    import jax

    records: dict[str, Record] = {"": (type(module).__name__, None, None, None)}

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        path = ".".join(context.module.path)
        if context.method_name == "__call__" and path not in records:
            shape = tuple(getattr(args[0], "shape", ())) if args else ()
            records[path] = _linen_record(context.module, shape)
        return next_fun(*args, **kwargs)

    rngs = {name: jax.random.key(i) for i, name in enumerate(("params", "dropout"))}
    with nn.intercept_methods(record):
        jax.eval_shape(lambda *xs: module.init(rngs, *xs, **(kwargs or {})), *example_inputs)
    return _plan(records, layout, chunking, linear_generator)


def plan_nnx_fusion(
    module: Any, layout: Layout, chunking: Chunking, *, linear_generator: bool = True
) -> FusionPlan:
    """The fusion plan of an NNX target (a live or abstract module)."""
    from flax import nnx

    records = {".".join(map(str, path)): _nnx_record(sub) for path, sub in nnx.iter_modules(module)}
    return _plan(records, layout, chunking, linear_generator)


# -- what a module is --------------------------------------------------------------------------


def _linen_record(module: Any, input_shape: tuple[int, ...]) -> Record:
    import flax.linen as nn
    from flax.linen.dtypes import promote_dtype

    name = type(module).__name__
    if type(module) is nn.Dense:
        if module.dot_general is not None or module.dot_general_cls is not None:
            return name, "dense", "a custom dot_general", None
        if module.promote_dtype is not promote_dtype:
            return name, "dense", "a custom promote_dtype", None
        return name, "dense", None, (input_shape[-1], module.features) if input_shape else None
    if type(module) is nn.Conv:
        custom = module.conv_general_dilated is not None or module.conv_general_dilated_cls
        if custom or module.promote_dtype is not promote_dtype:
            return name, "conv", "a custom conv_general_dilated or promote_dtype", None
        why = _conv_why(module.feature_group_count, module.mask, module.padding)
        if not isinstance(module.kernel_size, Iterable) or not input_shape:
            return name, "conv", why, None
        kernel = (*module.kernel_size, input_shape[-1], module.features)
        return name, "conv", why, kernel
    return name, None, None, None


def _nnx_record(module: Any) -> Record:
    import jax
    from flax import nnx
    from flax.nnx.nn.dtypes import promote_dtype

    name = type(module).__name__
    if type(module) is nnx.Linear:
        if module.dot_general is not jax.lax.dot_general:
            return name, "dense", "a custom dot_general", None
        if module.promote_dtype is not promote_dtype or module.preferred_element_type is not None:
            return name, "dense", "a custom promote_dtype or preferred_element_type", None
        return name, "dense", None, (module.in_features, module.out_features)
    if type(module) is nnx.Conv:
        if module.conv_general_dilated is not jax.lax.conv_general_dilated:
            return name, "conv", "a custom conv_general_dilated", None
        if module.promote_dtype is not promote_dtype or module.preferred_element_type is not None:
            return name, "conv", "a custom promote_dtype or preferred_element_type", None
        why = _conv_why(module.feature_group_count, module.mask, module.padding)
        groups = module.feature_group_count
        kernel = (*module.kernel_size, module.in_features // groups, module.out_features)
        return name, "conv", why, kernel
    return name, None, None, None


def _conv_why(groups: int, mask: Any, padding: Any) -> str | None:
    if groups != 1:
        return "grouped convolution"
    if mask is not None:
        return "a kernel mask"
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        return f"padding={padding!r}"
    return None


# -- the plan ----------------------------------------------------------------------------------


def _plan(
    records: dict[str, Record], layout: Layout, chunking: Chunking, linear_generator: bool
) -> FusionPlan:
    """Group the generated tensors by owning module, in layout order, and decide each owner."""
    owners: dict[str, dict[str, int]] = {}
    for i, t in enumerate(layout.generated):
        owner = ".".join(map(str, t.keys[:-1]))
        owners.setdefault(owner, {})[str(t.keys[-1])] = i
    fused: list[FusedLayer] = []
    per_sample: list[str] = []
    reasons: list[tuple[str, str]] = []
    for owner, own in owners.items():
        why, layer = _decide(owner, own, records.get(owner), layout, chunking, linear_generator)
        if layer is not None:
            fused.append(layer)
        else:
            per_sample.append(owner)
            reasons.append((owner, why))
    return FusionPlan(tuple(fused), tuple(per_sample), tuple(reasons))


def _decide(
    owner: str,
    own: dict[str, int],
    record: Record | None,
    layout: Layout,
    chunking: Chunking,
    linear_generator: bool,
) -> tuple[str, FusedLayer | None]:
    if record is None:
        return "its module was not found when tracing (a lifted transform?)", None
    name, kind, why, expected = record
    if kind is None:
        return f"{name} has no fused form", None
    if not linear_generator:
        return NONLINEAR_GENERATOR, None
    if why is not None:
        return why, None
    if "kernel" not in own:
        return "its kernel is not generated", None
    if set(own) - {"kernel", "bias"}:
        return "it owns other generated tensors", None
    kernel = layout.generated[own["kernel"]]
    if "bias" not in own and any(
        t.keys == (*kernel.keys[:-1], "bias") for t in layout.state if t.collection == "params"
    ):
        return "its bias is not generated", None
    if expected is not None and tuple(kernel.shape) != tuple(expected):
        return f"its kernel is {kernel.shape}, the layer computes with {expected}", None
    out = kernel.shape[-1]
    s = segments(kernel.offset, kernel.size // out, out, chunking.chunk_dim)
    if s > MAX_SEGMENTS:
        return f"a kernel row spans {s} chunks (more than {MAX_SEGMENTS})", None
    return "", FusedLayer(owner, kind, own["kernel"], own.get("bias"), s)
