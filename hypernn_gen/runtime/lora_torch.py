"""LoRA hypernetworks for PyTorch targets, built at run time (``generate="lora"``).

    hypernetwork = TorchHyperNetwork(model, generate="lora", lora_rank=8)   # static: one adapter set
    hypernetwork = TorchHyperNetwork(model, generate="lora", mode="dynamic", condition_shape=(4,))
    output, adapters = hypernetwork(tokens, condition=task_one_hot)          # one adapter set per sample
    hypernetwork.save_peft("out/", condition=task_one_hot[:1])              # a PEFT LoRA of one task

The model is copied and frozen; only the generator trains. Everything but the choice of layers
(:func:`hypernn_gen.adapters.lora_adapters`) is the kernel's
(:mod:`hypernn_gen.kernel.lora_torch`), which generated ``--generate lora`` files carry verbatim,
so a generated file and this class with the same options have the same parameters and outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from ..adapters import lora_adapters
from ..design import check_hidden
from ..errors import HyperNetworkError, HypernnGenError
from ..kernel.lora_torch import LoRAHyperModule
from ..kernel.torch import load_checkpoint

__all__ = ["TorchLoRAHyperNetwork", "base_state"]


def base_state(base: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``base=``: a checkpoint path (safetensors or torch) or a state dict."""
    if isinstance(base, Mapping):
        return dict(base)
    try:
        return load_checkpoint(base)
    except Exception as exc:  # noqa: BLE001 - one clear line for any unreadable file
        raise HyperNetworkError(
            f"base={str(base)!r} is not a readable checkpoint ({type(exc).__name__}); give a "
            ".safetensors file or a torch.save(model.state_dict()) file"
        ) from None


class TorchLoRAHyperNetwork(LoRAHyperModule):
    """A hypernetwork that generates LoRA adapters for a frozen copy of ``target_network``.

    Args mirror the CLI's flags: ``mode`` (``"static"``: one adapter set; ``"dynamic"``: one per
    sample from ``condition_shape``'s condition), ``lora_rank``, ``lora_alpha`` (scale
    ``alpha / rank``, default ``rank``), ``lora_dropout``, ``lora_generator`` (``"shared"``: one
    generator with layer embeddings, ``"per-layer"``: each layer its own heads),
    ``embedding_dim``, ``generator_hidden`` (a shared MLP trunk), ``embedding_hidden`` (the
    dynamic condition network), ``include`` (a predicate on parameter paths: adapt the Linear
    layers whose ``.weight`` it accepts; default: every Linear inside a block) and ``base`` (a
    checkpoint path or state dict of the base weights; default: the target's own).
    """

    def __init__(
        self,
        target_network: nn.Module,
        embedding_dim: int = 32,
        *,
        mode: str = "static",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_generator: str = "shared",
        generator_hidden: Sequence[int] = (),
        condition_shape: Sequence[int] | None = None,
        condition_dim: int | None = None,
        embedding_hidden: Sequence[int] = (64,),
        include: Callable[[str], bool] | None = None,
        base: str | Path | Mapping[str, Tensor] | None = None,
    ) -> None:
        if mode not in ("static", "dynamic"):
            raise HyperNetworkError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        if lora_generator not in ("shared", "per-layer"):
            raise HyperNetworkError(
                f"lora_generator must be 'shared' or 'per-layer', got {lora_generator!r}"
            )
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
            raise HyperNetworkError(f"lora_rank must be a positive integer, got {lora_rank!r}")
        if lora_alpha is not None and not lora_alpha > 0:
            raise HyperNetworkError(f"lora_alpha must be positive, got {lora_alpha}")
        if not 0.0 <= lora_dropout < 1.0:
            raise HyperNetworkError(f"lora_dropout must lie in [0, 1), got {lora_dropout}")
        try:
            adapters = lora_adapters(target_network, include)
        except HypernnGenError as exc:
            raise HyperNetworkError(
                str(exc).replace("--generate lora", 'generate="lora"')
            ) from None
        shape: tuple[int, ...] | None = None
        if mode == "dynamic":
            if condition_shape is not None:
                shape = tuple(condition_shape)
            elif condition_dim is not None:
                shape = (condition_dim,)
            else:
                raise HyperNetworkError(
                    'generate="lora" in dynamic mode needs condition_shape (one sample\'s '
                    "condition, e.g. (4,) for a one-hot task id)"
                )
            check_hidden(shape, "condition_shape")
        try:
            super().__init__(
                target_network,
                adapters,
                rank=lora_rank,
                alpha=float(lora_rank if lora_alpha is None else lora_alpha),
                dropout=lora_dropout,
                embedding_dim=embedding_dim,
                condition_shape=shape,
                embedding_hidden=check_hidden(tuple(embedding_hidden), "embedding_hidden"),
                generator_hidden=check_hidden(tuple(generator_hidden), "generator_hidden"),
                shared=lora_generator == "shared",
                base=None if base is None else base_state(base),
            )
        except ValueError as exc:  # the kernel's messages (a checkpoint that does not fit)
            raise HyperNetworkError(str(exc)) from None
        self.mode = mode
