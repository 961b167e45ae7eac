"""LoRA hypernetworks for Flax targets, built at run time: Linen and NNX (``--generate lora``).

    hypernetwork = FlaxLoRAHyperNetwork(model, lora_rank=8)                  # Linen, static
    variables = hypernetwork.init(jax.random.key(0), tokens)                 # params: the generator
    output, adapters = hypernetwork.apply(variables, tokens)                 # base: frozen

    hypernetwork = NNXLoRAHyperNetwork(model, mode="dynamic", condition_shape=(4,), rngs=rngs)
    output, adapters = hypernetwork(tokens, condition=task_one_hot)          # one set per sample

The target is frozen (Linen: the ``base`` collection; NNX: :class:`FrozenBase` variables, not
``nnx.Param``); only the generator trains. Everything but the choice of layers
(:func:`hypernn_gen.adapters.linen_lora_adapters`, :func:`~hypernn_gen.adapters.nnx_lora_adapters`)
is the kernel's (:mod:`hypernn_gen.kernel.lora_linen`, :mod:`hypernn_gen.kernel.lora_nnx`), which
generated ``--generate lora`` files carry verbatim: a generated file and these classes with the
same options have the same parameters and outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ...adapters import linen_lora_adapters, nnx_lora_adapters
from ...design import check_hidden
from ...errors import HyperNetworkError, HypernnGenError
from ...kernel.flax import is_array
from ...kernel.lora_flax import merge_adapters
from ...kernel.lora_linen import LinenLoRAHyperNetwork
from ...kernel.lora_nnx import FrozenBase, NNXLoRAHyperModule

__all__ = ["FlaxLoRAHyperNetwork", "FrozenBase", "NNXLoRAHyperNetwork", "merge_adapters"]


def check_lora_options(
    mode: str,
    lora_rank: Any,
    lora_alpha: Any,
    lora_dropout: float,
    lora_generator: str,
    condition_shape: Sequence[int] | None,
) -> tuple[int, ...] | None:
    """The runtime's checks of the LoRA keywords (the CLI's, with keyword names); returns the
    condition shape (``None``: static)."""
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
    if mode == "static":
        return None
    if condition_shape is None:
        raise HyperNetworkError(
            'generate="lora" in dynamic mode needs condition_shape (one sample\'s condition, '
            "e.g. (4,) for a one-hot task id)"
        )
    return check_hidden(tuple(condition_shape), "condition_shape")


def _runtime_error(exc: HypernnGenError) -> HyperNetworkError:
    return HyperNetworkError(str(exc).replace("--generate lora", 'generate="lora"'))


class FlaxLoRAHyperNetwork(LinenLoRAHyperNetwork):
    """A LoRA hypernetwork for the Linen module ``target_network`` (see
    :class:`~hypernn_gen.kernel.lora_linen.LinenLoRAHyperNetwork` for the call and the variables).

    Attributes mirror the CLI's flags: ``mode`` (``"dynamic"``: one adapter set per sample from
    ``condition_shape``'s condition), ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
    ``lora_generator``, ``embedding_dim``, ``generator_hidden``, ``embedding_hidden``, ``include``
    (a predicate on ``<layer>.kernel`` paths; default: every Dense inside a submodule) and
    ``base`` (a msgpack checkpoint path or variables; default: the target's own init). The
    adapted layers are found from the inputs of the first call.
    """

    mode: str = "static"
    include: Callable[[str], bool] | None = None
    error = HyperNetworkError

    def __post_init__(self) -> None:
        shape = check_lora_options(
            self.mode,
            self.lora_rank,
            self.lora_alpha,
            self.lora_dropout,
            self.lora_generator,
            self.condition_shape,
        )
        if self.mode == "static" and self.condition_shape is not None:
            raise HyperNetworkError("condition_shape applies to mode='dynamic' only")
        object.__setattr__(self, "condition_shape", shape)
        for name in ("embedding_hidden", "generator_hidden"):
            object.__setattr__(self, name, check_hidden(tuple(getattr(self, name)), name))
        super().__post_init__()

    def adapted_layers(self, inputs: tuple, kwargs: dict) -> tuple:
        """The adapted layers, found once per target, inputs' shapes and keywords."""
        if self.adapters:
            return self.adapters
        target = self.target_network.clone(parent=None)
        shapes = jax.tree.map(lambda x: (x.shape, str(x.dtype)) if is_array(x) else x, inputs)
        key = (target, self.include, repr(shapes), repr(kwargs))
        if key not in _FOUND:
            try:
                _FOUND[key] = linen_lora_adapters(target, inputs, kwargs, self.include)
            except HypernnGenError as exc:
                raise _runtime_error(exc) from None
        return _FOUND[key]


#: the adapted layers of Linen targets, by (target, include, input shapes, keywords)
_FOUND: dict[tuple, tuple] = {}


class NNXLoRAHyperNetwork(NNXLoRAHyperModule):
    """A LoRA hypernetwork for a frozen copy of the NNX module ``target_network`` (see
    :class:`~hypernn_gen.kernel.lora_nnx.NNXLoRAHyperModule` for the call).

    Args mirror the CLI's flags, as for :class:`FlaxLoRAHyperNetwork`; ``include`` is a predicate
    on ``<layer>.kernel`` paths (default: every Linear inside a submodule), ``base`` a msgpack
    checkpoint path or a pure dict of ``nnx.state(model)`` (default: the target's own weights).
    """

    error = HyperNetworkError

    def __init__(
        self,
        target_network: nnx.Module,
        embedding_dim: int = 32,
        *,
        mode: str = "static",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_generator: str = "shared",
        generator_hidden: Sequence[int] = (),
        condition_shape: Sequence[int] | None = None,
        embedding_hidden: Sequence[int] = (64,),
        include: Callable[[str], bool] | None = None,
        base: str | Path | Mapping[str, Any] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        shape = check_lora_options(
            mode, lora_rank, lora_alpha, lora_dropout, lora_generator, condition_shape
        )
        try:
            adapters = nnx_lora_adapters(target_network, include)
        except HypernnGenError as exc:
            raise _runtime_error(exc) from None
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
            base=None if base is None else str(base) if isinstance(base, Path) else base,
            rngs=rngs,
        )
        self.mode = mode
