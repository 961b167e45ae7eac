"""Trace a Flax target (Linen or NNX) into a :class:`~hypernn_gen.layout.Layout`.

Entry points:

* :func:`trace_linen` reads a Linen module's variable tree from ``jax.eval_shape(module.init,
  ...)``: shapes only, no parameter memory.
* :func:`trace_nnx_factory` builds an NNX module with ``nnx.eval_shape(factory)`` (no memory).
* :func:`trace_nnx_module` reads a live NNX module.

Init statistics (``init_mean``/``init_std``) are measured by a ``jax.jit``-compiled function that
runs the initialiser and returns only one ``(mean, std)`` pair per tensor, so XLA never keeps the
whole parameter tree alive. Linen uses the fixed key ``jax.random.key(0)``; an NNX factory uses
its own ``nnx.Rngs``; a live NNX module is measured from its current values.

Order (deterministic): Linen lists the ``params`` collection first, in ``jax.tree`` flatten
order (dict keys sorted as strings, so ``Dense_10`` comes before ``Dense_2``), then every other
collection sorted by name. NNX lists ``nnx.state(module)`` in its own flat order (also sorted
by key; list indices stay ``int`` and sort numerically). A variable reachable under two paths
(tied weights) appears once, under the path ``nnx.state`` gives it; NNX aliases are not listed.

Fans follow Flax's convention (``nn.initializers.variance_scaling``): a kernel ``(in, out)``
or conv kernel ``(*receptive, in, out)`` has ``fan_in = in * prod(receptive)`` and
``fan_out = out * prod(receptive)``; a 1-D tensor's fans are its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import TraceError
from .layout import Key, Layout, TensorSpec, round_stat

#: Measured statistics are float32 reductions whose last bits depend on how XLA fuses them;
#: four significant digits keep generated files byte-identical across compilations.
MEASURED_DIGITS = 4

__all__ = ["trace_linen", "trace_nnx_factory", "trace_nnx_module"]

Include = Callable[[str], bool] | None
Stats = tuple[float, float, str]  # (mean, std, source)
_DEFAULT_RNGS = ("params", "dropout")


# -- Linen --------------------------------------------------------------------------------------


def trace_linen(
    module: Any,
    example_inputs: tuple,
    *,
    include: Include = None,
    init_kwargs: dict[str, Any] | None = None,
    measure: bool = True,
    rng_names: Iterable[str] = (),
) -> Layout:
    """Layout of a Linen module for inputs shaped like ``example_inputs``.

    Args:
        module: an (unbound) ``flax.linen.Module``.
        example_inputs: positional inputs of ``module.init``: arrays or ``jax.ShapeDtypeStruct``
            (anything else, a Python flag say, is passed through as is).
        include: predicate on dotted ``params`` paths; parameters it rejects stay state
            (``reason="excluded"``). ``None`` generates every ``params`` leaf.
        init_kwargs: keyword arguments of ``module.init`` (``train=False``, say).
        measure: measure init statistics (one compiled init run); ``False`` gives the structure
            only, with assumed statistics (``0`` mean, ``1/sqrt(fan_in)`` std for >= 2-D).
        rng_names: rng streams besides ``params`` and ``dropout`` the module's init needs.

    Every collection is listed: ``params`` is generated, any other (``batch_stats``, ``cache``,
    ...) is state with ``reason="collection"``.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise TraceError(
            f"expected a flax.linen.Module target, got {type(module).__name__}; pass the module "
            "instance (e.g. MLP(features=...))"
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    avals, rebuild = _array_inputs(example_inputs)
    init = _linen_init(module, init_kwargs or {}, (*_DEFAULT_RNGS, *rng_names))
    try:
        shapes = jax.eval_shape(lambda *xs: init(*rebuild(xs)), *avals)
    except Exception as exc:  # noqa: BLE001 - the user's init failed; say so with a fix
        raise TraceError(
            f"{type(module).__name__}.init failed on inputs shaped "
            f"{[(tuple(a.shape), str(a.dtype)) for a in avals]}: {type(exc).__name__}: {exc}. "
            "Pass inputs the target accepts (--input-shape), or declare its whole call in the "
            'target file: example_call = ((x,), {"train": False})'
        ) from exc
    entries = _linen_entries(shapes)
    stats: list[Stats] | None = None
    notes: tuple[str, ...] = ()
    if measure:
        try:
            stats = _measure_jitted(lambda: _linen_leaves(init(*rebuild(_zeros(avals)))))
        except Exception as exc:  # noqa: BLE001 - fall back to assumed statistics
            notes = (f"init statistics assumed: measuring them failed ({type(exc).__name__})",)
    specs = []
    for i, (collection, keys, leaf) in enumerate(entries):
        path = ".".join(map(str, keys))
        if collection == "params":
            excluded = include is not None and not include(path)
            role, reason = ("state", "excluded") if excluded else ("generated", "")
        else:
            role, reason = "state", "collection"
        specs.append(_spec(keys, leaf, role, collection, reason, stats[i] if stats else None))
    return _build("linen", type(module).__name__, specs, notes, "params collection")


def _linen_init(module: Any, kwargs: dict[str, Any], rng_names: Sequence[str]) -> Callable:
    """``inputs -> variables`` with fixed rngs (``jax.random.key(0)`` for ``params``)."""

    def init(*inputs: Any) -> Any:
        base = jax.random.key(0)
        rngs = {
            name: jax.random.fold_in(base, i) for i, name in enumerate(dict.fromkeys(rng_names))
        }
        rngs["params"] = base
        return _unbox(module.init(rngs, *inputs, **kwargs))

    return init


def _unbox(tree: Any) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _linen_entries(variables: Any) -> list[tuple[str, tuple[Key, ...], Any]]:
    """``(collection, keys, leaf)`` for every variable: ``params`` first, then by name."""
    entries = []
    collections = sorted(variables, key=lambda c: (c != "params", c))
    for collection in collections:
        leaves, _ = jax.tree.flatten_with_path(variables[collection])
        for path, leaf in leaves:
            entries.append((collection, tuple(_key(p) for p in path), leaf))
    return entries


def _linen_leaves(variables: Any) -> list[Any]:
    return [leaf for _, _, leaf in _linen_entries(variables)]


# -- NNX ----------------------------------------------------------------------------------------


def trace_nnx_factory(factory: Callable[[], Any], *, include: Include = None) -> Layout:
    """Layout of the NNX module ``factory()`` builds, without allocating its parameters.

    The structure comes from ``nnx.eval_shape(factory)``; init statistics from one compiled
    run of ``factory`` that returns only per-tensor ``(mean, std)``.
    """
    from flax import nnx

    try:
        abstract = nnx.eval_shape(factory)
    except Exception as exc:  # noqa: BLE001 - the factory failed
        raise TraceError(
            f"building the target with nnx.eval_shape(factory) failed: {type(exc).__name__}: "
            f"{exc}; the factory must build the module with its own nnx.Rngs"
        ) from exc
    _check_nnx(abstract)
    notes: tuple[str, ...] = ()
    try:
        stats = _measure_jitted(lambda: [v.get_value() for _, v in _nnx_entries(factory())])
    except Exception as exc:  # noqa: BLE001 - fall back to assumed statistics
        stats = None
        notes = (f"init statistics assumed: measuring them failed ({type(exc).__name__})",)
    return _trace_nnx(abstract, include, stats, notes)


def trace_nnx_module(module: Any, *, include: Include = None) -> Layout:
    """Layout of a live NNX module; init statistics are measured from its current values.

    ``nnx.Param`` variables are generated; every other variable (``BatchStat``, ``RngKey``,
    ``RngCount``, ``Cache``, ...) is state whose ``collection`` is its type name. Abstract or
    traced values get assumed statistics.
    """
    _check_nnx(module)
    values = [v.get_value() for _, v in _nnx_entries(module)]
    stats = None
    if all(_is_concrete(x) for x in values):
        stats = [(float(m), float(s), "measured") for m, s in np.asarray(_stats_table(values))]
    return _trace_nnx(module, include, stats, ())


def _check_nnx(module: Any) -> None:
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TraceError(
            f"expected a flax.nnx.Module target, got {type(module).__name__}; pass the module "
            "instance, or a zero-argument factory that builds it"
        )


def _nnx_entries(module: Any) -> list[tuple[tuple[Key, ...], Any]]:
    """``(path, variable)`` pairs of ``nnx.state(module)``; shared variables appear once."""
    from flax import nnx

    return [(tuple(path), var) for path, var in nnx.to_flat_state(nnx.state(module))]


def _trace_nnx(module: Any, include: Include, stats: list[Stats] | None, notes: tuple) -> Layout:
    from flax import nnx

    specs = []
    for i, (keys, var) in enumerate(_nnx_entries(module)):
        path = ".".join(map(str, keys))
        if isinstance(var, nnx.Param):
            excluded = include is not None and not include(path)
            role, reason = ("state", "excluded") if excluded else ("generated", "")
        else:
            role, reason = "state", "collection"
        leaf = var.get_value()
        specs.append(
            _spec(keys, leaf, role, type(var).__name__, reason, stats[i] if stats else None)
        )
    return _build("nnx", type(module).__name__, specs, notes, "nnx.Param variable")


# -- shared -------------------------------------------------------------------------------------


def _build(framework: str, name: str, specs: list[TensorSpec], notes: tuple, what: str) -> Layout:
    layout = Layout.build(framework, name, specs, notes)
    if layout.num_generated == 0:
        raise TraceError(
            f"{name} has no floating-point parameters to generate (no {what} the include "
            "predicate accepts); check the target and the include/exclude patterns"
        )
    return layout


def _spec(
    keys: tuple[Key, ...], leaf: Any, role: str, collection: str, reason: str, stats: Stats | None
) -> TensorSpec:
    shape = tuple(int(s) for s in leaf.shape)
    fan_in, fan_out = _fans(shape)
    if stats is None:
        stats = (
            (0.0, 1.0 / math.sqrt(fan_in), "assumed") if len(shape) >= 2 else (0.0, 0.0, "assumed")
        )
    mean, std, source = stats
    return TensorSpec(
        keys=keys,
        shape=shape,
        dtype=str(leaf.dtype),
        role=role,  # type: ignore[arg-type]
        collection=collection,
        fan_in=fan_in,
        fan_out=fan_out,
        init_mean=round_stat(mean, MEASURED_DIGITS),
        init_std=round_stat(std, MEASURED_DIGITS),
        init_source=source,
        reason=reason,
    )


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Flax's fans (``variance_scaling``): ``in * receptive``, ``out * receptive`` for a kernel
    ``(*receptive, in, out)``; 1-D: its length; 0-D: ``(1, 1)``."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _key(entry: Any) -> Key:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            value = getattr(entry, attr)
            return value if isinstance(value, int) else str(value)
    return str(entry)


def _array_inputs(inputs: tuple) -> tuple[tuple, Callable[[Sequence[Any]], tuple]]:
    """Abstract values of the array-like inputs, and ``arrays -> full inputs`` (others static,
    PRNG keys too: measuring the init runs it on zeros, and a key cannot be zeros)."""
    positions = [
        i
        for i, x in enumerate(inputs)
        if hasattr(x, "shape") and hasattr(x, "dtype") and "key<" not in str(x.dtype)
    ]
    avals = tuple(_aval(inputs[i]) for i in positions)

    def rebuild(arrays: Sequence[Any]) -> tuple:
        full = list(inputs)
        for i, x in zip(positions, arrays, strict=True):
            full[i] = x
        return tuple(full)

    return avals, rebuild


def _aval(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _zeros(avals: Sequence[jax.ShapeDtypeStruct]) -> list[jax.Array]:
    return [jnp.zeros(a.shape, a.dtype) for a in avals]


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _is_concrete(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) or (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    )


def _leaf_stats(leaves: Sequence[Any]) -> list[tuple[jax.Array, jax.Array]]:
    """Population ``(mean, std)`` of each floating leaf (float32); ``(0, 0)`` for the rest."""
    zero = jnp.zeros((), jnp.float32)
    out = []
    for x in leaves:
        if not _is_float(x) or x.size == 0:
            out.append((zero, zero))
            continue
        x = jnp.asarray(x, jnp.float32)
        out.append((x.mean(), x.std() if x.size > 1 else zero))
    return out


def _table(leaves: Sequence[Any]) -> jax.Array:
    """``(num_leaves, 2)`` table of per-leaf ``(mean, std)``."""
    stats = _leaf_stats(leaves)
    if not stats:
        return jnp.zeros((0, 2), jnp.float32)
    return jnp.stack([jnp.stack(s) for s in stats])


_stats_table = jax.jit(_table)  # live values: one compile per tree structure and shapes


def _measure_jitted(make_leaves: Callable[[], Sequence[Any]]) -> list[Stats]:
    """Run ``make_leaves()`` compiled, keeping only per-leaf statistics (not the leaves).

    Inside an outer trace (a hypernetwork's ``init`` under ``jax.jit``) the result is a tracer;
    then ``ensure_compile_time_eval`` runs it concretely (op by op, so only there: it is slow).
    """
    measure = jax.jit(lambda: _table(make_leaves()))
    try:
        table = np.asarray(measure())
    except jax.errors.TracerArrayConversionError:
        with jax.ensure_compile_time_eval():
            table = np.asarray(measure())
    return [(float(m), float(s), "measured") for m, s in table]
