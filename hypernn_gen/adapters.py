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
    "delta_layout",
    "describe_base",
    "load_base",
    "lora_adapters",
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
        if include is None:
            if not isinstance(sub, nn.Linear) or not ints:
                continue
        elif "weight" not in sub._parameters or not include(f"{path}.weight"):
            continue
        elif not isinstance(sub, nn.Linear):
            raise GenerationError(
                f"--generate lora adapts nn.Linear layers, and {path!r} is a "
                f"{type(sub).__name__}; --exclude '{path}.*' (or use --generate delta for it)"
            )
        key = (re.sub(r"(?<![^.])\d+(?![^.])", "*", path), sub.out_features, sub.in_features)
        kind = kinds.setdefault(key, len(kinds))
        adapters.append(
            Adapter(path, sub.out_features, sub.in_features, ints[0] if ints else 0, kind)
        )
    if not adapters:
        how = "no --include/--exclude glob selects" if include else "the target has no"
        raise GenerationError(
            f"--generate lora found nothing to adapt: {how} nn.Linear layer inside a block; "
            "select layers with --include, e.g. --include '*.weight'"
        )
    return tuple(adapters)


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


def lora_report(adapters: tuple, options: Any, base: str) -> dict[str, Any]:
    """What ``inspect --generate lora`` shows: per layer its base shape, depth, kind and adapter
    size; the totals and the generator's trainable parameter count (built on ``meta``)."""
    import torch

    from .kernel.lora_torch import LoRAGenerator

    rank = options.lora_rank
    shape = tuple(options.condition_shape) if options.condition_shape else (1,)
    with torch.device("meta"):
        generator = LoRAGenerator(
            adapters,
            rank,
            options.embedding_dim,
            shape if options.dynamic else None,
            tuple(options.embedding_hidden),
            tuple(options.generator_hidden),
            options.lora_generator == "shared",
        )
    layers = [
        {
            "path": a.path,
            "base_shape": [a.out_features, a.in_features],
            "depth": a.depth,
            "kind": a.kind,
            "rank": rank,
            "adapter_values": rank * (a.in_features + a.out_features),
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
        "base_values": sum(a.in_features * a.out_features for a in adapters),
        "generator_params": sum(p.numel() for p in generator.parameters()),
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
