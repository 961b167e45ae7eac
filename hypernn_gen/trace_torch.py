"""Trace a PyTorch target into a :class:`~hypernn_gen.layout.Layout`.

Two entry points:

* :func:`trace_module` reads a live ``nn.Module`` (the runtime library's input). Init statistics
  are measured from its current values.
* :func:`trace_factory` builds the target on the ``meta`` device, so no parameter memory is
  allocated, and records the initialisers torch runs on each tensor (``kaiming_uniform_``,
  ``normal_``, ``fill_``, ...) to know its default init scale without any values. If the
  target cannot be built on ``meta`` it falls back to a real build and says so in the notes.
* :func:`trace_instance` reads a module *instance* the CLI was given (``target = MyNet()`` in
  the target file). Its statistics come from the distribution each tensor was drawn from: the
  module's ``reset_parameters`` is replayed on a ``meta`` copy under the same recorder, and its
  result is used where the live values agree with it. Tensors it cannot model keep statistics
  measured from their values, which :mod:`hypernn_gen.seeding` makes the same in every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import TraceError
from .layout import Layout, TensorSpec, round_stat
from .seeding import IMPORT_SEED, seeded_import

__all__ = [
    "check_dynamic_support",
    "model_init_stats",
    "trace_factory",
    "trace_instance",
    "trace_module",
]

Stats = tuple[float, float, str]  # (mean, std, source)


def trace_module(
    module: nn.Module,
    *,
    init_stats: dict[int, Stats] | None = None,
    notes: tuple[str, ...] = (),
    include: Callable[[str], bool] | None = None,
) -> Layout:
    """Layout of a live (or meta) module, in ``named_parameters()`` order, then buffers.

    Args:
        module: the target.
        init_stats: statistics keyed by storage key (see :func:`_storage_key`); measured from
            the values when missing and the tensor is not on ``meta``.
        notes: carried into the layout (shown by ``inspect`` and in generated headers).
        include: a predicate on parameter paths; trainable parameters it rejects stay state
            (``reason="excluded"``). ``None`` generates every trainable parameter.
    """
    if not isinstance(module, nn.Module):
        raise TraceError(
            f"expected a torch.nn.Module target, got {type(module).__name__}; pass the module "
            "instance (or a class or factory to the CLI)"
        )
    init_stats = init_stats or {}
    specs: list[TensorSpec] = []
    canonical: dict[int, int] = {}  # id(tensor) -> index in specs

    for kind, items in (
        ("parameter", module.named_parameters(remove_duplicate=False)),
        ("buffer", module.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in items:
            if tensor is None:
                continue
            keys = tuple(name.split("."))
            if id(tensor) in canonical:  # tied: generated once, under its first name
                i = canonical[id(tensor)]
                specs[i] = _with_alias(specs[i], keys)
                continue
            canonical[id(tensor)] = len(specs)
            if kind == "parameter" and tensor.requires_grad:
                excluded = include is not None and not include(name)
                role, reason = ("state", "excluded") if excluded else ("generated", "")
            elif kind == "parameter":
                role, reason = "state", "frozen"
            else:
                role, reason = "state", "buffer"
            fan_in, fan_out = _fans(tuple(tensor.shape))
            mean, std, source = init_stats.get(_storage_key(tensor)) or _measure(tensor, fan_in)
            specs.append(
                TensorSpec(
                    keys=keys,
                    shape=tuple(int(s) for s in tensor.shape),
                    dtype=str(tensor.dtype).removeprefix("torch."),
                    role=role,
                    collection=kind,
                    fan_in=fan_in,
                    fan_out=fan_out,
                    init_mean=round_stat(mean),
                    init_std=round_stat(std),
                    init_source=source,
                    reason=reason,
                )
            )
    layout = Layout.build("torch", type(module).__name__, specs, notes)
    if layout.num_generated == 0:
        raise TraceError(
            f"{type(module).__name__} has no trainable floating-point parameters to generate; "
            "check requires_grad and the include/exclude patterns"
        )
    return layout


def trace_factory(
    factory: Callable[[], nn.Module],
    *,
    include: Callable[[str], bool] | None = None,
) -> tuple[Layout, nn.Module]:
    """Build the target with ``factory`` on the meta device and trace it.

    Returns the layout and the (meta, or real on fallback) module, whose structure the
    generator reads. Falls back to a real CPU build when the meta build fails.
    """
    recorder = _InitRecorder()
    try:
        with torch.device("meta"), recorder:
            module = factory()
        notes: tuple[str, ...] = ()
    except Exception as exc:  # noqa: BLE001 - any failure on meta means "try for real"
        with seeded_import():  # the measured statistics are the same in every run
            module = factory()
        recorder.stats.clear()
        notes = (
            f"traced by a real build under torch.manual_seed(0): building on the meta device "
            f"failed ({type(exc).__name__}: {exc})",
        )
    if not isinstance(module, nn.Module):
        raise TraceError(
            f"the factory returned {type(module).__name__}, not a torch.nn.Module; "
            "return the module instance"
        )
    stats = recorder.stats
    if module is not None and _is_meta(module):
        stats, note = _check_against_real_build(factory, module, stats)
        if note:
            notes = (*notes, note)
    return trace_module(module, init_stats=stats, notes=notes, include=include), module


# Targets up to this many values are also built for real (seed 0) to check the recorded
# statistics: libraries such as transformers skip their own initialisation on ``meta``.
REAL_BUILD_LIMIT = 10_000_000  # 40 MB of float32: a quick build
REAL_BUILD_SEED = IMPORT_SEED  # the same seeded generators as the target file's import
# Significant digits kept for a statistic measured from the seeded build (stable across
# platforms; the sampling noise of a tensor's std is far above 1e-3 for all but huge tensors).
MEASURED_DIGITS = 3


def _is_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.parameters())


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (name, t)
        for items in (
            module.named_parameters(remove_duplicate=False),
            module.named_buffers(remove_duplicate=False),
        )
        for name, t in items
        if t is not None
    ]


def _agrees(recorded: Stats, measured: Stats, numel: int) -> bool:
    """Whether a seeded sample is consistent with the recorded distribution (5 sigma)."""
    mean, std, _ = recorded
    m_mean, m_std, _ = measured
    n = max(numel, 1)
    slack = 1e-6 + 1e-6 * abs(mean)
    if abs(m_mean - mean) > 5 * std / math.sqrt(n) + slack:
        return False
    # the sample std of n draws has a relative spread of about sqrt(1/(2n)) (normal) and below
    # that for a uniform; 5 sigma plus 2% for the truncation and kurtosis of other shapes
    return abs(m_std - std) <= std * (0.02 + 5 * math.sqrt(1 / (2 * n))) + slack


def _check_against_real_build(
    factory: Callable[[], nn.Module], meta: nn.Module, stats: dict[int, Stats]
) -> tuple[dict[int, Stats], str | None]:
    """Replace recorded statistics a seeded real CPU build contradicts by the measured ones.

    The recorder sees what runs on ``meta``; a library that initialises differently off ``meta``
    (transformers' ``_init_weights``, timm's ``trunc_normal_``) is caught here. Targets over
    :data:`REAL_BUILD_LIMIT` values are not built (their statistics stay as recorded).
    """
    named = _named_tensors(meta)
    if sum(t.numel() for _, t in named) > REAL_BUILD_LIMIT:
        return stats, None
    try:
        with seeded_import():
            real = factory()
        real_tensors = dict(_named_tensors(real))
    except Exception:  # noqa: BLE001 - the meta statistics stand when no real build is possible
        return stats, None
    out = dict(stats)
    replaced = 0
    for name, tensor in named:
        twin = real_tensors.get(name)
        if twin is None or tuple(twin.shape) != tuple(tensor.shape):
            continue
        key = _storage_key(tensor)
        measured = _measure(twin, 1)
        recorded = stats.get(key) or _measure(tensor, _fans(tuple(tensor.shape))[0])
        if twin.is_floating_point() and not _agrees(recorded, measured, twin.numel()):
            mean, std, _ = measured
            if abs(mean) <= 5 * std / math.sqrt(max(twin.numel(), 1)):
                mean = 0.0  # a sample mean consistent with zero: the distribution's is zero
            out[key] = (
                round_stat(mean, MEASURED_DIGITS),
                round_stat(std, MEASURED_DIGITS),
                "measured",
            )
            replaced += 1
    note = (
        f"init statistics of {replaced} tensor(s) measured from a real CPU build with seed "
        f"{REAL_BUILD_SEED}: the initialisers seen on the meta device do not match them"
        if replaced
        else None
    )
    return out, note


def trace_instance(
    module: nn.Module,
    *,
    include: Callable[[str], bool] | None = None,
) -> Layout:
    """Layout of a module instance with init statistics that do not depend on its random draw.

    Each floating-point tensor whose default init :func:`model_init_stats` can replay, and whose
    live values agree with that distribution (so a loaded or re-initialised tensor is not taken
    for a default one), gets the distribution's statistics; any other tensor is measured. The
    notes say how many of each.
    """
    if not isinstance(module, nn.Module):
        return trace_module(module, include=include)  # raises the usual TraceError
    modelled = model_init_stats(module)
    stats: dict[int, Stats] = {}
    seen: set[int] = set()
    measured = 0
    for tensor in (*module.parameters(), *module.buffers()):
        key = _storage_key(tensor)
        if key in seen or tensor is None:
            continue
        seen.add(key)
        model = modelled.get(id(tensor))
        if not (tensor.is_floating_point() and tensor.numel()):
            continue
        if model is not None and _plausible_draw(tensor, model):
            stats[key] = model
        else:
            measured += 1
    total = len(stats) + measured
    note = f"init statistics: {len(stats)} of {total} tensors from their module type's default init"
    if measured:
        note += f", {measured} measured from values drawn under torch.manual_seed(0) at import"
    return trace_module(module, init_stats=stats, notes=(note,), include=include)


def model_init_stats(module: nn.Module) -> dict[int, Stats]:
    """The distribution each tensor's default init draws from, keyed by ``id`` of the tensor.

    Every submodule with a ``reset_parameters`` (or ``_reset_parameters``, as
    ``nn.MultiheadAttention``) is copied with ``meta`` stand-ins for its tensors and the method
    is run under :class:`_InitRecorder`, children before parents, as construction runs them.
    Tensors no replay initialises, or whose replay fails, are absent.
    """
    clones: dict[int, nn.Module] = {}
    originals: dict[int, torch.Tensor] = {}  # id(meta stand-in) -> original tensor

    def clone(sub: nn.Module) -> nn.Module:
        if id(sub) in clones:
            return clones[id(sub)]
        copy = object.__new__(type(sub))
        copy.__dict__.update(sub.__dict__)
        clones[id(sub)] = copy
        copy._parameters = {}
        for name, p in sub._parameters.items():
            if p is None:
                copy._parameters[name] = None
                continue
            stand_in = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            originals[id(stand_in)] = p
            copy._parameters[name] = stand_in
        copy._buffers = {}
        for name, b in sub._buffers.items():
            stand_in = None if b is None else torch.empty_like(b, device="meta")
            if b is not None:
                originals[id(stand_in)] = b
            copy._buffers[name] = stand_in
        copy._modules = {n: None if c is None else clone(c) for n, c in sub._modules.items()}
        return copy

    root = clone(module)
    recorder = _InitRecorder()
    order: list[nn.Module] = []
    _post_order(root, order, set())
    with torch.no_grad():
        for sub in order:
            reset = getattr(sub, "reset_parameters", None) or getattr(
                sub, "_reset_parameters", None
            )
            if not callable(reset):
                continue
            before = dict(recorder.stats)
            try:
                with torch.device("meta"), recorder:
                    reset()
            except Exception:  # noqa: BLE001 - a replay that fails models nothing
                recorder.stats = before
    by_key = {
        _storage_key(t): orig
        for c in order
        for t in (*c._parameters.values(), *c._buffers.values())
        if t is not None and (orig := originals.get(id(t))) is not None
    }
    return {id(by_key[k]): v for k, v in recorder.stats.items() if k in by_key}


def _post_order(module: nn.Module, out: list[nn.Module], seen: set[int]) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module._modules.values():
        if child is not None:
            _post_order(child, out, seen)
    out.append(module)


def _plausible_draw(tensor: torch.Tensor, model: Stats) -> bool:
    """Whether the values are a plausible draw from the distribution ``model`` describes.

    A constant must match to float precision. A draw from a continuous distribution must not be
    constant; a uniform one must lie in its support ``[-b, b]`` around the mean and reach past
    ``b * 1e-9 ** (1 / n)`` (all ``n`` values stay inside that with probability 1e-9). The sample
    mean and std must lie within six standard errors of the model's (the std's error bound is
    a normal's, 0.71 std/sqrt(n), larger than a uniform's, plus a 2% margin).
    """
    if tensor.device.type == "meta":
        return True
    mean, std, source = model
    values = tensor.detach().double().flatten()
    n = values.numel()
    got_mean = float(values.mean())
    got_std = float(values.std(unbiased=False)) if n > 1 else 0.0
    if std == 0.0:
        scale = max(1.0, abs(mean))
        return abs(got_mean - mean) <= 1e-6 * scale and got_std <= 1e-6 * scale
    if n > 1 and got_std == 0.0:
        return False
    if "uniform" in source:
        bound = math.sqrt(3) * std
        reach = float((values - mean).abs().max())
        if reach > bound * (1 + 1e-6) or reach < bound * 1e-9 ** (1 / n):
            return False
    if n < 2:
        return abs(got_mean - mean) <= 6 * std
    return (
        abs(got_mean - mean) <= 6 * std / math.sqrt(n)
        and abs(got_std - std) <= 6 * 0.71 * std / math.sqrt(n) + 0.02 * std
    )


# -- init statistics ----------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage behind a tensor; a Parameter shares it with the tensor it wraps."""
    try:
        return tensor.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - tensor subclasses without storage
        return id(tensor)


def _measure(tensor: torch.Tensor, fan_in: int) -> Stats:
    if tensor.device.type == "meta":
        # No initialiser was recorded: assume a variance-preserving weight and a zero 1-D tensor.
        if tensor.dim() >= 2:
            return 0.0, 1.0 / math.sqrt(fan_in), "assumed"
        return 0.0, 0.0, "assumed"
    if not (tensor.is_floating_point() and tensor.numel()):
        return 0.0, 0.0, "measured"
    values = tensor.detach().float()
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return float(values.mean()), std, "measured"


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``torch.nn.init``'s fan_in/fan_out; a 1-D tensor's fans are its length."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _with_alias(spec: TensorSpec, keys: tuple[str, ...]) -> TensorSpec:
    from dataclasses import replace

    return replace(spec, aliases=(*spec.aliases, keys))


class _InitRecorder(TorchFunctionMode):
    """Records the distribution each initialiser leaves in a tensor, keyed by storage.

    Handles torch.nn.init's functions and the in-place tensor methods they use; any other
    in-place write makes the tensor "unknown" (and :func:`_measure` then assumes a scale).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[int, Stats] = {}
        self._keep: list[torch.Tensor] = []  # keep storages alive so keys stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        try:
            self._record(getattr(func, "__name__", ""), args, kwargs, result)
        except Exception:  # noqa: BLE001 - recording must never break the target's build
            pass
        return result

    def __enter__(self) -> _InitRecorder:
        # trunc_normal_ returns early on meta tensors without touching them: wrap it to see it.
        original = self._trunc_normal = nn.init.trunc_normal_

        def trunc_normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._record("trunc_normal_", (tensor, *args), kwargs, tensor)
            return original(tensor, *args, **kwargs)

        nn.init.trunc_normal_ = trunc_normal_
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        nn.init.trunc_normal_ = self._trunc_normal
        super().__exit__(*exc)

    def _set(self, tensor: Any, stats: Stats | None) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        key = _storage_key(tensor)
        if stats is None:
            self.stats.pop(key, None)
        else:
            self.stats[key] = stats
            self._keep.append(tensor)

    def _record(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:  # noqa: C901
        def arg(i: int, key: str, default: Any) -> Any:
            return args[i] if len(args) > i else kwargs.get(key, default)

        first = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if name == "uniform_":
            lo, hi = float(arg(1, "a", arg(1, "from", 0.0))), float(arg(2, "b", arg(2, "to", 1.0)))
            self._set(first, ((lo + hi) / 2, (hi - lo) / math.sqrt(12), "uniform_"))
        elif name == "normal_":
            self._set(first, (float(arg(1, "mean", 0.0)), float(arg(2, "std", 1.0)), "normal_"))
        elif name in ("fill_", "constant_"):
            value = arg(1, "val", arg(1, "value", 0.0))
            if isinstance(value, torch.Tensor):
                self._set(first, None)
            else:
                self._set(first, (float(value), 0.0, "constant"))
        elif name == "zero_":
            self._set(first, (0.0, 0.0, "constant"))
        elif name in ("kaiming_uniform_", "kaiming_normal_"):
            a = float(arg(1, "a", 0.0))
            mode = arg(2, "mode", "fan_in")
            nonlinearity = arg(3, "nonlinearity", "leaky_relu")
            fan = nn.init._calculate_correct_fan(first, mode)
            std = nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)
            self._set(first, (0.0, std, name))
        elif name == "trunc_normal_":  # reported by the wrapper in __enter__ (a no-op on meta)
            self._set(first, (float(arg(1, "mean", 0.0)), float(arg(2, "std", 1.0)), name))
        elif name in ("mul_", "div_", "add_", "sub_"):
            key = _storage_key(first)
            other = arg(1, "other", None)
            if key not in self.stats or not isinstance(other, (int, float)):
                self._set(first, None)
                return
            mean, std, source = self.stats[key]
            if name == "mul_":
                mean, std = mean * other, std * abs(other)
            elif name == "div_":
                mean, std = mean / other, std / abs(other)
            elif name == "add_":
                mean += other * float(kwargs.get("alpha", 1))
            else:
                mean -= other * float(kwargs.get("alpha", 1))
            self._set(first, (mean, std, source))
        elif name in ("clamp_", "clip_"):
            pass  # trunc_normal_'s final clamp: keep the statistics
        elif name in ("randn", "rand", "zeros", "ones", "full", "empty"):
            stats = {
                "randn": (0.0, 1.0, "randn"),
                "rand": (0.5, 1 / math.sqrt(12), "rand"),
                "zeros": (0.0, 0.0, "constant"),
                "ones": (1.0, 0.0, "constant"),
            }.get(name)
            if name == "full":
                fill = arg(1, "fill_value", 0.0)
                stats = (float(fill), 0.0, "constant") if isinstance(fill, (int, float)) else None
            self._set(result, stats)
        elif name in ("mul", "__mul__", "__rmul__", "div", "__truediv__", "add", "__add__", "sub"):
            # out-of-place scalar arithmetic, e.g. nn.Parameter(torch.randn(n) * 0.02)
            if not isinstance(first, torch.Tensor) or _storage_key(first) not in self.stats:
                return
            other = arg(1, "other", None)
            if not isinstance(other, (int, float)):
                return
            mean, std, source = self.stats[_storage_key(first)]
            if name in ("mul", "__mul__", "__rmul__"):
                mean, std = mean * other, std * abs(other)
            elif name in ("div", "__truediv__"):
                mean, std = mean / other, std / abs(other)
            elif name in ("add", "__add__"):
                mean += other
            else:
                mean -= other
            self._set(result, (mean, std, source))
        elif (
            name.endswith("_")
            and not name.startswith("__")
            and isinstance(first, torch.Tensor)
            and name != "requires_grad_"
        ):
            self._set(first, None)  # an in-place write we do not model


def check_dynamic_support(module: nn.Module, layout: Layout) -> None:
    """Refuse targets that per-sample weights cannot run through (``torch.func.vmap``).

    ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and their cells call fused kernels that ``vmap`` has no
    batching rule for, so one weight set per sample is impossible there, even with their own
    parameters kept out (every sample runs through the whole target). Static mode works, and so
    does a recurrence written with ``nn.Linear`` gates.
    """
    for path, sub in module.named_modules():
        if isinstance(sub, nn.RNNBase | nn.RNNCellBase):  # generated or not: run per sample
            raise TraceError(
                f"dynamic mode cannot generate {path or 'the target'} ({type(sub).__name__}): "
                "torch.func.vmap has no batching rule for its fused kernel, which every sample "
                "runs through, even with its parameters excluded; use static mode, or write the "
                "recurrence with nn.Linear gates (e.g. gates = self.gates(torch.cat([x_t, h], -1)))"
            )
