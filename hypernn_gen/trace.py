"""Trace a loaded target into a :class:`~hypernn_gen.layout.Layout`, whatever its framework.

:func:`trace_target` dispatches on :attr:`LoadedTarget.framework`:

* ``"torch"``: :func:`hypernn_gen.trace_torch.trace_factory` builds the target on the ``meta``
  device (an instance is read with :func:`~hypernn_gen.trace_torch.trace_instance`, whose init
  statistics come from the modelled default init or from values drawn under a fixed seed). With example
  inputs, the target then runs once on ``meta`` tensors of those shapes, which checks that the
  shapes fit without computing anything.
* ``"linen"``: :func:`hypernn_gen.trace_flax.trace_linen` with the example inputs.
* ``"nnx"``: :func:`hypernn_gen.trace_flax.trace_nnx_factory` (an instance:
  :func:`~hypernn_gen.trace_flax.trace_nnx_module`).

Each framework's tracer is imported only when needed, so a PyTorch-only user needs no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .errors import HypernnGenError, TraceError
from .layout import Layout
from .load import LoadedTarget, build_fix
from .select import check_patterns, path_filter

__all__ = ["trace_selected", "trace_target"]


def trace_target(
    loaded: LoadedTarget,
    *,
    include: Callable[[str], bool] | None = None,
) -> Layout:
    """The layout of ``loaded``'s parameter tree, traced without allocating its parameters.

    Args:
        loaded: from :func:`hypernn_gen.load.load_target`.
        include: a predicate on parameter paths (see :func:`hypernn_gen.select.path_filter`);
            trainable parameters it rejects stay state with ``reason="excluded"``.

    Raises:
        TraceError: the target cannot be built, its example inputs do not fit it, or (raised by
            the framework's tracer) it has no trainable floating-point parameters to generate.
    """
    from .backends import framework_backend  # the table names this module's tracers

    return framework_backend(loaded.framework, loaded.display).load("tracer")(loaded, include)


def trace_selected(
    loaded: LoadedTarget,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Layout:
    """:func:`trace_target` with ``--include``/``--exclude`` globs (:mod:`hypernn_gen.select`).

    The patterns are checked against the unfiltered layout first, so a pattern that matches no
    parameter is reported by name (a typo, usually) rather than as "nothing to generate".

    Raises:
        TraceError: as :func:`trace_target`, or a pattern matches no trainable parameter.
    """
    if not include and not exclude:
        return trace_target(loaded)
    # Traced with the filter only: a tensor it keeps out (a complex parameter) is never checked
    # as a generated one. Its layout still lists every trainable path (excluded ones as state).
    try:
        layout = trace_target(loaded, include=path_filter(include, exclude))
    except TraceError:  # nothing left to generate: a pattern that matches nothing explains it
        try:
            unfiltered = trace_target(loaded)
        except TraceError:
            unfiltered = None
        if unfiltered is not None:
            check_patterns(unfiltered, include=include, exclude=exclude)
        raise
    check_patterns(layout, include=include, exclude=exclude)
    return layout


def _build_failed(loaded: LoadedTarget, exc: Exception) -> TraceError:
    fix = build_fix(exc, "fix the target so that it builds with no arguments")
    return TraceError(f"building {loaded.display} failed: {loaded.describe_exception(exc)}; {fix}")


def _shapes_text(loaded: LoadedTarget) -> str:
    shapes = ", ".join(str(spec.shape) for spec in loaded.input_specs)
    return f"input shape {shapes}" if len(loaded.input_specs) == 1 else f"input shapes {shapes}"


def _inputs_do_not_fit(loaded: LoadedTarget, exc: Exception) -> TraceError:
    verb = "does" if len(loaded.input_specs) == 1 else "do"
    if "of different dtypes" in str(exc):
        dtypes = ", ".join(sorted({spec.dtype for spec in loaded.input_specs}))
        return TraceError(
            f"input dtype {dtypes} {verb} not fit the target: {loaded.describe_exception(exc)}; "
            "pass the dtype its forward expects with --input-dtype, e.g. --input-dtype float32"
        )
    return TraceError(
        f"{_shapes_text(loaded)} {verb} not fit the target: {loaded.describe_exception(exc)}; "
        "pass the shapes the target's forward expects with --input-shape"
    )


# -- torch ----------------------------------------------------------------------------------------


def _trace_torch(loaded: LoadedTarget, include: Callable[[str], bool] | None) -> Layout:
    from . import trace_torch

    try:
        if loaded.factory is None:
            module = loaded.obj
            layout = trace_torch.trace_instance(module, include=include)
        else:
            layout, module = trace_torch.trace_factory(loaded.factory, include=include)
    except HypernnGenError:
        raise
    except Exception as exc:
        raise _build_failed(loaded, exc) from exc
    if loaded.input_specs:
        note = _check_torch_inputs(loaded, module)
        if note:
            layout = dataclasses.replace(layout, notes=(*layout.notes, note))
    return layout


def torch_meta_call(loaded: LoadedTarget) -> tuple[tuple, dict]:
    """The example call, positional and keyword arguments, with every tensor on ``meta``: the
    file's ``example_call``/``example_input(s)`` objects, or ``--input-shape`` stand-ins."""
    import torch
    from torch.utils import _pytree as pytree

    def meta(x: Any) -> Any:
        return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x

    kwargs = pytree.tree_map(meta, dict(loaded.example_kwargs))
    if loaded.example_inputs is None:  # --input-shape replaces the positional arguments only
        args = tuple(
            torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")
            for spec in loaded.input_specs
        )
        return args, kwargs
    return pytree.tree_map(meta, tuple(loaded.example_inputs)), kwargs


def _check_torch_inputs(loaded: LoadedTarget, module: Any) -> str | None:
    """Run ``module`` once on ``meta`` inputs; a note when the forward cannot run on ``meta``.

    The module's own parameters are swapped for ``meta`` stand-ins, so a live instance is left
    untouched and nothing is computed or allocated.
    """
    import torch
    from torch.func import functional_call

    inputs, kwargs = torch_meta_call(loaded)
    stand_ins = {
        name: tensor if tensor.device.type == "meta" else torch.empty_like(tensor, device="meta")
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
    }
    try:
        with torch.no_grad(), _same_dtype_mode()():
            functional_call(module, stand_ins, inputs, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, with its location
        if "meta" in str(exc).lower():
            return (
                f"{_shapes_text(loaded)} not checked: the forward pass cannot run on the meta "
                f"device ({loaded.describe_exception(exc)})"
            )
        raise _inputs_do_not_fit(loaded, exc) from exc
    return None


def _same_dtype_mode() -> type:
    """A dispatch mode that checks what ``meta`` kernels do not: matmul/conv operand dtypes.

    On the CPU, ``nn.Linear`` given an int64 input fails ("expected m1 and m2 to have the same
    dtype"); its ``meta`` kernel returns an int64 result instead, so ``--input-dtype int64``
    would generate a file that crashes on first use.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    aten = torch.ops.aten
    checked = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.addmv, aten.mv}

    class SameDtype(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func.overloadpacket in checked:
                leaves = tree_leaves((args, kwargs or {}))
                dtypes = sorted({str(t.dtype) for t in leaves if isinstance(t, torch.Tensor)})
                if len(dtypes) > 1:
                    raise RuntimeError(
                        f"{func.overloadpacket.__name__} got tensors of different dtypes "
                        f"({', '.join(d.removeprefix('torch.') for d in dtypes)})"
                    )
            return func(*args, **(kwargs or {}))

    return SameDtype


# -- flax -----------------------------------------------------------------------------------------


def _jax_inputs(loaded: LoadedTarget) -> tuple[Any, ...]:
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    if not loaded.input_specs:
        raise TraceError(
            f"{loaded.display} is a Flax module without example inputs; pass --input-shape 1,8 "
            "(once per input) or define example_input in the target file"
        )
    import jax

    return tuple(jax.ShapeDtypeStruct(spec.shape, spec.dtype) for spec in loaded.input_specs)


def jax_kwargs(loaded: LoadedTarget) -> dict[str, Any]:
    """The example call's keyword arguments, fresh (an ``nnx.Rngs`` is made anew each time)."""
    if loaded.example_call is not None:
        return loaded.example_call()[1]
    return dict(loaded.example_kwargs)


def _trace_linen(loaded: LoadedTarget, include: Callable[[str], bool] | None) -> Layout:
    from . import trace_flax

    inputs = _jax_inputs(loaded)
    try:
        module = loaded.obj if loaded.factory is None else loaded.factory()
    except Exception as exc:
        raise _build_failed(loaded, exc) from exc
    try:
        return trace_flax.trace_linen(
            module, inputs, include=include, init_kwargs=jax_kwargs(loaded)
        )
    except HypernnGenError:
        raise
    except Exception as exc:
        raise TraceError(
            f"initialising {loaded.display} with {_shapes_text(loaded)} failed: "
            f"{loaded.describe_exception(exc)}; pass the shapes its __call__ expects with "
            "--input-shape, or fix the target"
        ) from exc


def _trace_nnx(loaded: LoadedTarget, include: Callable[[str], bool] | None) -> Layout:
    from . import trace_flax

    try:
        if loaded.factory is None:
            layout = trace_flax.trace_nnx_module(loaded.obj, include=include)
        else:
            layout = trace_flax.trace_nnx_factory(loaded.factory, include=include)
    except HypernnGenError:
        raise
    except Exception as exc:
        raise _build_failed(loaded, exc) from exc
    if loaded.input_specs:
        _check_nnx_inputs(loaded)
    return layout


def _check_nnx_inputs(loaded: LoadedTarget) -> None:
    """Call the NNX module once under ``jax.eval_shape`` on the example inputs (no compute)."""
    from flax import nnx

    inputs = _jax_inputs(loaded)
    module = loaded.obj if loaded.factory is None else nnx.eval_shape(loaded.factory)
    try:  # nnx.eval_shape: an nnx.Rngs among the arguments is a graph node, not a constant
        nnx.eval_shape(lambda m, xs, kw: m(*xs, **kw), module, inputs, jax_kwargs(loaded))
    except Exception as exc:  # noqa: BLE001 - any failure is reported, with its location
        raise _inputs_do_not_fit(loaded, exc) from exc
