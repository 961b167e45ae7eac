"""Which layers get adapters (``--generate lora``), and the base weights (``--base``).

:func:`lora_adapters` picks the adapted ``nn.Linear`` layers of a Torch module: by default every
Linear inside a block (its path has an integer component, as ``layers.3.self_attn.q_proj``: the
attention and MLP projections of a transformer, not its LM head or a top-level classifier); with
``--include``/``--exclude`` globs, every Linear whose ``<path>.weight`` they select. Each layer's
*depth* is the first integer in its path (its block) and its *kind* the path with integers
replaced by ``*`` and its shape (the module type): the layer embeddings of the shared generator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import GenerationError

__all__ = [
    "DELTA_FALLBACK_STD",
    "GENERATES",
    "adapter_out",
    "check_base",
    "delta_layout",
    "describe_base",
    "generator_params",
    "load_base",
    "linen_lora_adapters",
    "lora_adapters",
    "nnx_lora_adapters",
]

GENERATES = ("weights", "delta", "lora")


def lora_adapters(module: Any, include: Callable[[str], bool] | None = None) -> tuple:
    """The :class:`~hypernn_gen.kernel.lora_torch.Adapter` of every adapted layer, in module order."""
    from torch import nn

    from .kernel.lora_torch import Adapter

    kinds: dict[tuple, int] = {}
    adapters = []
    direct = {  # Linear layers whose weight their parent uses without calling them
        f"{path}.out_proj".lstrip(".")
        for path, sub in module.named_modules()
        if isinstance(sub, nn.MultiheadAttention)
    }
    for path, sub in module.named_modules():
        if path in direct:
            if include is not None and include(f"{path}.weight"):
                raise GenerationError(
                    f"--generate lora cannot adapt {path!r}: nn.MultiheadAttention uses its weight "
                    f"without calling it; --exclude '{path}.*'"
                )
            continue
        ints = [int(p) for p in path.split(".") if p.isdigit()]
        conv1d = _is_conv1d(sub)
        if include is None:
            if not (isinstance(sub, nn.Linear) or conv1d) or not ints:
                continue
        elif "weight" not in sub._parameters or not include(f"{path}.weight"):
            continue
        elif isinstance(sub, nn.Conv2d) and (sub.groups != 1 or sub.padding_mode != "zeros"):
            raise GenerationError(
                f"--generate lora adapts nn.Conv2d layers with groups=1 and zero padding, and "
                f"{path!r} has groups={sub.groups}, padding_mode={sub.padding_mode!r}; "
                f"--exclude '{path}.*'"
            )
        elif not (isinstance(sub, nn.Linear | nn.Conv2d) or conv1d):
            raise GenerationError(
                f"--generate lora adapts nn.Linear, nn.Conv2d (and transformers' Conv1D) layers, and "
                f"{path!r} is a {type(sub).__name__}; --exclude '{path}.*' (or use --generate "
                "delta for it)"
            )
        if conv1d:  # weight (in, out)
            in_features, out_features = sub.weight.shape
        elif isinstance(sub, nn.Conv2d):  # A (rank, in * kh * kw): a row of the weight each
            out_features, in_features = sub.out_channels, sub.weight[0].numel()
        else:
            in_features, out_features = sub.in_features, sub.out_features
        key = (re.sub(r"(?<![^.])\d+(?![^.])", "*", path), out_features, in_features)
        kind = kinds.setdefault(key, len(kinds))
        depth = ints[0] if ints else 0
        adapters.append(Adapter(path, out_features, in_features, depth, kind, conv1d))
    if not adapters:
        how = "no --include/--exclude glob selects" if include else "the target has no"
        raise GenerationError(
            f"--generate lora found nothing to adapt: {how} nn.Linear (or Conv1D) layer inside a block; "
            "select layers with --include, e.g. --include '*.weight'"
        )
    return tuple(adapters)


def _is_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D`` (GPT-2's layers): ``y = x @ weight + bias``, weight ``(in, out)``."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def load_base(path: str | Path) -> dict[str, Any]:
    """A checkpoint's tensors (safetensors by suffix, else a torch state dict), or one clear
    :class:`GenerationError`."""
    from .kernel.lora_torch import load_checkpoint

    if not Path(path).is_file():
        raise GenerationError(f"--base {path}: no such file; give a .safetensors or .pt checkpoint")
    try:
        return load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear line
        raise GenerationError(
            f"--base {path}: not a state dict ({type(exc).__name__}: {str(exc)[:80]}); save one "
            "with torch.save(model.state_dict(), path) or safetensors"
        ) from None


def check_base(path: str | Path, framework: str) -> None:
    """Refuse a ``--base`` checkpoint that is missing or unreadable for the target's framework:
    Torch: safetensors or a torch state dict; Linen/NNX: a ``flax.serialization`` msgpack file."""
    if framework == "torch":
        load_base(path)
        return
    if not Path(path).is_file():
        raise GenerationError(
            f"--base {path}: no such file; give a msgpack checkpoint "
            "(flax.serialization.msgpack_serialize of the variables)"
        )
    from .kernel.flax import read_checkpoint

    try:
        tree = read_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear line
        raise GenerationError(
            f"--base {path}: not a msgpack checkpoint ({type(exc).__name__}); save one with "
            "flax.serialization.msgpack_serialize(variables)"
        ) from None
    if not isinstance(tree, dict):
        raise GenerationError(
            f"--base {path}: holds a {type(tree).__name__}, not a tree of variables; save one with "
            "flax.serialization.msgpack_serialize(variables)"
        )


def adapter_out(adapter: Any) -> int:
    """An adapter's output size (Torch: ``out_features``; Flax: the product of its features)."""
    import math

    shape = getattr(adapter, "out_shape", None)
    return adapter.out_features if shape is None else math.prod(shape)


def describe_base(base: str | None, factory: str) -> str:
    """The header's ``base:`` line: where the frozen base weights come from."""
    return f"checkpoint {base}" if base else f"the target's own weights ({factory})"


#: the decode scale of a delta whose tensor's own init std is 0 (a bias, a norm's weight)
DELTA_FALLBACK_STD = 0.01


def delta_layout(layout: Any) -> Any:
    """``--generate delta``: each generated tensor's decode starts at shift 0 (the delta starts at
    exactly 0 with the zeroed generator output) and scale its init std (or
    :data:`DELTA_FALLBACK_STD` where that is 0, so that every delta can learn)."""
    import dataclasses

    tensors = tuple(
        (
            dataclasses.replace(t, init_mean=0.0, init_std=t.init_std or DELTA_FALLBACK_STD)
            if t.generated
            else t
        )
        for t in layout.tensors
    )
    return dataclasses.replace(layout, tensors=tensors)


def generator_params(adapters: tuple, options: Any, framework: str = "torch") -> int:
    """The trainable parameter count of a LoRA generator (built on ``meta`` / traced shapes)."""
    rank = options.lora_rank
    shape = tuple(options.condition_shape) if options.condition_shape else (1,)
    args = (
        adapters,
        rank,
        options.embedding_dim,
        shape if options.dynamic else None,
        tuple(options.embedding_hidden),
        tuple(options.generator_hidden),
        options.lora_generator == "shared",
    )
    if framework == "torch":
        import torch

        from .kernel.lora_torch import LoRAGenerator

        with torch.device("meta"):
            return sum(p.numel() for p in LoRAGenerator(*args).parameters())
    import jax
    import jax.numpy as jnp

    if framework == "linen":
        from .kernel.lora_linen import LinenLoRAGenerator

        condition = jnp.zeros((1, *shape)) if options.dynamic else None
        init = LinenLoRAGenerator(*args).init
        variables = jax.eval_shape(lambda: init(jax.random.key(0), condition))
        return sum(x.size for x in jax.tree.leaves(variables["params"]))
    from flax import nnx

    from .kernel.lora_nnx import NNXLoRAGenerator

    generator = nnx.eval_shape(lambda: NNXLoRAGenerator(*args, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(generator, nnx.Param)))


def lora_report(
    adapters: tuple, options: Any, base: str, framework: str = "torch"
) -> dict[str, Any]:
    """What ``inspect --generate lora`` shows: per layer its base shape ``(out, in)``, depth,
    kind and adapter size; the totals and the generator's trainable parameter count."""
    rank = options.lora_rank
    layers = [
        {
            "path": a.path,
            "base_shape": [adapter_out(a), a.in_features],
            "depth": a.depth,
            "kind": a.kind,
            "rank": rank,
            "adapter_values": rank * (a.in_features + adapter_out(a)),
        }
        for a in adapters
    ]
    return {
        "rank": rank,
        "alpha": float(options.lora_alpha or rank),
        "generator": options.lora_generator,
        "base": base,
        "layers": layers,
        "adapter_values": sum(layer["adapter_values"] for layer in layers),
        "base_values": sum(a.in_features * adapter_out(a) for a in adapters),
        "generator_params": generator_params(adapters, options, framework),
    }


def format_lora(report: dict[str, Any]) -> str:
    """The ``inspect`` table of :func:`lora_report`."""
    rows = [("layer", "base shape", "depth", "kind", "rank", "adapter values")]
    for layer in report["layers"]:
        out, inp = layer["base_shape"]
        rows.append(
            (
                layer["path"],
                f"({out}, {inp})",
                str(layer["depth"]),
                str(layer["kind"]),
                str(layer["rank"]),
                f"{layer['adapter_values']:,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"LoRA adapters (--generate lora): rank {report['rank']}, alpha {report['alpha']}, "
        f"generator {report['generator']}",
        f"base: {report['base']}",
        "",
    ]
    for i, row in enumerate(rows):
        cells = [
            c.ljust(w) if j < 2 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"{len(report['layers'])} adapted layers: {report['adapter_values']:,} adapter values per "
        f"set for {report['base_values']:,} frozen base weights; the generator has "
        f"{report['generator_params']:,} trainable parameters",
    ]
    return "\n".join(lines)


# -- Flax (Linen and NNX): the adapted layers -------------------------------------------------


def _depth_of(parents: tuple) -> tuple[int, int | None]:
    """The block index of a layer from its parents' keys: the first integer key, or the number
    ending a Linen name (``Block_3``); ``(0, None)`` without one. Also the key's position."""
    for i, key in enumerate(parents):
        if isinstance(key, int) or str(key).isdigit():
            return int(key), i
        match = re.fullmatch(r".*_(\d+)", str(key))
        if match:
            return int(match.group(1)), i
    return 0, None


def _flax_adapters(found: list[tuple[tuple, tuple, tuple, int]], framework: str) -> tuple:
    """Adapters from ``(keys, in_shape, out_shape, in_dims)`` of the selected layers."""
    import math

    from .kernel.lora_flax import Adapter

    kinds: dict[tuple, int] = {}
    adapters = []
    for keys, in_shape, out_shape, in_dims in found:
        depth, at = _depth_of(keys[:-1])
        pattern = tuple("*" if i == at else str(k) for i, k in enumerate(keys))
        in_features = math.prod(in_shape)
        kind = kinds.setdefault((pattern, in_features, tuple(out_shape)), len(kinds))
        path = ".".join(map(str, keys))
        adapters.append(
            Adapter(path, tuple(keys), in_features, tuple(out_shape), in_dims, depth, kind)
        )
    if not adapters:
        raise GenerationError(
            f"--generate lora found nothing to adapt: the target has no {framework} Dense layer "
            "inside a submodule that --include/--exclude select; select layers with --include, "
            "e.g. --include '*.kernel'"
        )
    return tuple(adapters)


def _select(path: str, keys: tuple, include: Callable[[str], bool] | None) -> bool:
    if include is None:
        return len(keys) >= 2  # inside a submodule: not a top-level head
    return include(f"{path}.kernel")


def linen_lora_adapters(
    module: Any, inputs: tuple, kwargs: dict, include: Callable[[str], bool] | None = None
) -> tuple:
    """The :class:`~hypernn_gen.kernel.lora_flax.Adapter` of every adapted ``nn.Dense`` /
    ``nn.DenseGeneral`` (trailing contracted axes) of a Linen module, in call order."""
    import flax.linen as nn
    import jax

    calls: dict[tuple, tuple] = {}

    def record(next_fun: Callable, args: tuple, kw: dict, context: Any) -> Any:
        m = context.module
        if context.method_name == "__call__" and m.path not in calls and args:
            calls[m.path] = (m, tuple(args[0].shape))
        return next_fun(*args, **kw)

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: module.init(rngs, *inputs, **kwargs))
    params = nn.meta.unbox(variables).get("params", {})
    found = []
    for keys, (m, x_shape) in calls.items():
        path = ".".join(keys)
        node: Any = params
        for key in keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or "kernel" not in node or not _select(path, keys, include):
            continue
        kernel = tuple(node["kernel"].shape)
        if type(m) is nn.Dense:
            found.append((keys, kernel[:1], kernel[1:], 1))
            continue
        axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
        axis = tuple(sorted(a % len(x_shape) for a in axis))
        trailing = axis == tuple(range(len(x_shape) - len(axis), len(x_shape)))
        if type(m) is not nn.DenseGeneral or m.batch_dims or not trailing:
            if include is None:
                continue
            raise GenerationError(
                f"--generate lora adapts nn.Dense and nn.DenseGeneral (contracting the last "
                f"axes) layers, and {path!r} is a {type(m).__name__}; --exclude '{path}.*'"
            )
        n = len(axis)
        found.append((keys, kernel[:n], kernel[n:], n))
    return _flax_adapters(found, "Linen")


def nnx_lora_adapters(module: Any, include: Callable[[str], bool] | None = None) -> tuple:
    """The :class:`~hypernn_gen.kernel.lora_flax.Adapter` of every adapted ``nnx.Linear`` /
    ``nnx.LinearGeneral`` (negative trailing axes) of an NNX module, in module order."""
    from flax import nnx

    found = []
    for keys, m in nnx.iter_modules(module):
        keys = tuple(keys)
        path = ".".join(map(str, keys))
        kernel_var = getattr(m, "kernel", None)
        if not keys or not isinstance(kernel_var, nnx.Variable) or not _select(path, keys, include):
            continue
        kernel = tuple(kernel_var.get_value().shape)
        if type(m) is nnx.Linear:
            found.append((keys, kernel[:1], kernel[1:], 1))
            continue
        axis = tuple(getattr(m, "axis", ()) or ())
        trailing = axis == tuple(range(-len(axis), 0))
        if type(m) is not nnx.LinearGeneral or m.batch_axis or not trailing:
            if include is None:
                continue
            raise GenerationError(
                f"--generate lora adapts nnx.Linear and nnx.LinearGeneral (contracting the last "
                f"axes, negative axis) layers, and {path!r} is a {type(m).__name__}; "
                f"--exclude '{path}.*'"
            )
        n = len(axis)
        found.append((keys, kernel[:n], kernel[n:], n))
    return _flax_adapters(found, "NNX")
