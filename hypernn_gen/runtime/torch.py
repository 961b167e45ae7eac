"""Hypernetworks for PyTorch targets, built at run time from a live module.

This is the reference implementation: generated Torch modules are tested against it, and the
two share parameter names, so ``generated.load_state_dict(runtime.state_dict())`` works.

    hypernetwork = TorchHyperNetwork(target)                   # static, sensible defaults
    output, generated_params = hypernetwork(x)

    hypernetwork = TorchHyperNetwork(target, mode="dynamic", condition_dim=8)
    output, generated_params = hypernetwork(x)                 # one weight set per sample

How weights are made (see :mod:`hypernn_gen.layout` for the contract):

* the embedding module returns a table ``(num_embeddings, embedding_dim)`` (static) or
  ``(batch, num_embeddings, embedding_dim)`` (dynamic: the learned table scaled per sample by a
  vector computed from the conditioning input, as in hyper-nn and Ha et al.);
* the weight generator maps each embedding to a chunk of ``chunk_dim`` values (default: one
  linear layer); the chunks, flattened, give the raw vector;
* each generated tensor ``t`` is ``param_shift[t] + param_scale[t] * raw[slice of t]``, with
  ``param_scale``/``param_shift`` learnable and initialised to the target's own init std/mean, so
  the generated weights start at the scale the target's authors chose.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from ..adapters import GENERATES, delta_layout
from ..design import (
    BATCH_NORM_STATS,
    GRADIENT_SCALINGS,
    check_hidden,
    design_layout,
    group_gradient_multipliers,
    group_rows,
    layout_gradient_multipliers,
)
from ..errors import HyperNetworkError
from ..kernel.torch import (
    apply_base,
    carry_digest,
    decode,
    flatten_params,
    grouped_linear,
    normalize_raw,
    row_factors,
    run_per_sample,
    scale_grad,
    scaled_linear,
    set_batch_norm_statistics,
    unflatten_params,
    without_generated,
    zero_output,
)
from ..layout import Layout, checkpoint_digest
from ..trace_torch import check_dynamic_support, trace_module

__all__ = [
    "DynamicEmbedding",
    "GroupedLinearWeightGenerator",
    "LinearWeightGenerator",
    "MLPWeightGenerator",
    "StaticEmbedding",
    "TorchEmbeddingModule",
    "TorchHyperNetwork",
    "TorchWeightGenerator",
]

Mode = Literal["static", "dynamic"]
#: ``"one"``: one linear generator for every chunk; ``"std"``: one head per group of tensors of
#: similar init std, each tensor's raw values normalised (hypernn_gen.design.std_groups)
GENERATOR_GROUPS = ("one", "std")


class TorchEmbeddingModule(nn.Module):
    """Base class of embedding modules: ``forward()`` (static) or ``forward(condition)`` (dynamic).

    Subclasses return ``(num_embeddings, embedding_dim)`` in static mode and
    ``(batch, num_embeddings, embedding_dim)`` in dynamic mode.
    """

    def __init__(self, embedding_dim: int, num_embeddings: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")


class TorchWeightGenerator(nn.Module):
    """Base class of weight generators: ``forward(embedding)`` -> ``(..., num_embeddings, hidden_dim)``.

    ``hidden_dim`` is the chunk size: the number of values made from one embedding. Returning the
    chunks flattened (``.view(-1)``, as hyper-nn's examples do) is accepted too.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim


def row_scale(module: nn.Module) -> Any:
    """The table's gradient multiplier: per row (``row_scale``, a grouped generator's) or one."""
    return (
        getattr(module, "row_scale", None)
        if module.gradient_scale is None
        else (module.gradient_scale)
    )


class StaticEmbedding(TorchEmbeddingModule):
    """A learned table of ``num_embeddings`` vectors, entries ~ N(0, 1).

    ``gradient_scale``: the multiplier of the table's gradient (``None``: none), set by
    :class:`TorchHyperNetwork` with gradient scaling on.
    """

    gradient_scale: float | None = None

    def __init__(self, embedding_dim: int, num_embeddings: int) -> None:
        super().__init__(embedding_dim, num_embeddings)
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    def forward(self) -> torch.Tensor:
        return scale_grad(self.weight, row_scale(self))


class DynamicEmbedding(TorchEmbeddingModule):
    """The learned table, scaled per sample: ``E[b, k] = (1 + m(c_b)[k]) * weight[k]``.

    ``m`` is an MLP (hidden widths ``embedding_hidden``, ReLU) of the flattened conditioning
    input ``c``. Its last layer starts at a tenth of PyTorch's default scale, so weight sets
    start close together and drift apart as the network learns to use the condition.
    ``condition_dim=None`` infers it on first call.
    ``gradient_scale``: as in :class:`StaticEmbedding`.
    """

    gradient_scale: float | None = None

    def __init__(
        self,
        embedding_dim: int,
        num_embeddings: int,
        condition_dim: int | None = None,
        embedding_hidden: Sequence[int] = (64,),
    ) -> None:
        super().__init__(embedding_dim, num_embeddings)
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
        hidden_widths = check_hidden(tuple(embedding_hidden), "embedding_hidden")
        if not hidden_widths and not condition_dim:
            raise HyperNetworkError(
                "an embedding network without hidden layers needs condition_dim (or "
                "condition_shape) to size its only layer; pass it, or embedding_hidden=(64,)"
            )
        layers: list[nn.Module] = []
        width = condition_dim
        for hidden in hidden_widths:
            layers += [nn.Linear(width, hidden) if width else nn.LazyLinear(hidden), nn.ReLU()]
            width = hidden
        self.modulation = nn.Sequential(*layers, nn.Linear(width, num_embeddings))
        with torch.no_grad():
            self.modulation[-1].weight.mul_(0.1)
            self.modulation[-1].bias.zero_()

    def scales(self, condition: torch.Tensor) -> torch.Tensor:
        """Per-sample scale of each embedding, ``(batch, num_embeddings)``."""
        return 1.0 + self.modulation(condition.flatten(1).to(self.weight.dtype))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.scales(condition).unsqueeze(-1) * scale_grad(self.weight, row_scale(self))


class LinearWeightGenerator(TorchWeightGenerator):
    """One linear map from an embedding to a chunk; unit-variance output at init.

    Linearity is what lets generated dynamic modules compute per-sample layers without
    materialising per-sample weights. ``gradient_scale``: the multipliers of the weight's and
    the bias's gradients, set by :class:`TorchHyperNetwork` with gradient scaling on.
    """

    gradient_scale: tuple[float | None, float | None] = (None, None)

    def __init__(self, embedding_dim: int, hidden_dim: int) -> None:
        super().__init__(embedding_dim, hidden_dim)
        self.linear = nn.Linear(embedding_dim, hidden_dim)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 1.0 / math.sqrt(embedding_dim))
            self.linear.bias.zero_()

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return scaled_linear(self.linear, embedding, *self.gradient_scale)


class GroupedLinearWeightGenerator(TorchWeightGenerator):
    """One linear head per group of chunks (``generator_groups="std"``): chunk ``k`` is made by
    the head of the group whose ``rows`` hold it (:func:`hypernn_gen.design.group_rows`), each
    head initialised as :class:`LinearWeightGenerator`'s. ``weight (G, C, D)``, ``bias (G, C)``;
    ``gradient_scale``: per group, the table's, weight's and bias's multipliers (the table's
    are applied by the embedding module)."""

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int,
        rows: tuple[tuple[int, ...], ...],
        gradient_scale: tuple | None = None,
    ) -> None:
        super().__init__(embedding_dim, hidden_dim)
        self.rows, self.gradient_scale = rows, gradient_scale
        self.weight = nn.Parameter(torch.empty(len(rows), hidden_dim, embedding_dim))
        self.bias = nn.Parameter(torch.zeros(len(rows), hidden_dim))
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 / math.sqrt(embedding_dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return grouped_linear(embedding, self.weight, self.bias, self.rows, self.gradient_scale)


class MLPWeightGenerator(TorchWeightGenerator):
    """An MLP from an embedding to a chunk: hidden widths ``generator_hidden``, ReLU between.

    Hidden layers are He-normal, the output layer ``N(0, 1/width)``, biases zero, so the output
    has unit variance at init, as :class:`LinearWeightGenerator`'s. Not linear: dynamic
    hypernetworks with it materialise every sample's weights.
    """

    def __init__(
        self, embedding_dim: int, hidden_dim: int, generator_hidden: Sequence[int] = (64,)
    ) -> None:
        super().__init__(embedding_dim, hidden_dim)
        layers: list[nn.Module] = []
        width = embedding_dim
        for hidden in check_hidden(tuple(generator_hidden), "generator_hidden"):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.layers = nn.Sequential(*layers, nn.Linear(width, hidden_dim))
        linears = self.layers[::2]
        with torch.no_grad():
            for i, layer in enumerate(linears):
                gain = 1.0 if i == len(linears) - 1 else 2.0  # ReLU halves the second moment
                layer.weight.normal_(0.0, math.sqrt(gain / layer.in_features))
                layer.bias.zero_()

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class TorchHyperNetwork(nn.Module):
    """A hypernetwork for ``target_network``: its trainable parameters are generated.

    Args:
        target_network: any ``nn.Module``. It is copied; the copy keeps buffers and frozen
            parameters (``requires_grad=False``) as ordinary state, and gives up the tensors the
            hypernetwork generates.
        embedding_module_constructor: ``(embedding_dim, num_embeddings) -> TorchEmbeddingModule``.
            Default: :class:`StaticEmbedding` or :class:`DynamicEmbedding` by ``mode``.
        weight_generator_constructor: ``(embedding_dim, hidden_dim) -> TorchWeightGenerator``.
            Default: :class:`LinearWeightGenerator`.
        embedding_dim: size of each embedding.
        num_embeddings, chunk_dim: give one (or neither: chunks that hold whole rows of the
            layers, near the square root of the generated parameter count); the other is
            derived so that ``num_embeddings * chunk_dim`` covers the flat vector.
        mode: ``"static"`` (one weight set) or ``"dynamic"`` (one weight set per sample).
        chunking: ``"auto"`` (``"tensor"`` when no size is given, else ``"flat"``), ``"flat"``
            (chunks run across tensors, as in hyper-nn) or ``"tensor"`` (every tensor starts on
            a chunk boundary); see :mod:`hypernn_gen.design`.
        generator_hidden: hidden widths of the default weight generator (``()``: linear).
        init_scheme: ``"target"`` (each tensor starts with the target's own init mean/std),
            ``"hyperfan-in"`` or ``"hyperfan-out"`` (Chang et al. 2020).
        condition_shape: dynamic mode, default embedding: one sample's conditioning input
            (``None``: inferred on the first call). ``condition_dim``, its flattened size, is
            accepted too.
        embedding_hidden: dynamic mode, default embedding: hidden widths of its network.
        include: optional predicate on parameter paths; trainable parameters it rejects stay
            ordinary parameters of the copied target.
        generate: ``"weights"`` (the generated tensors are the target's), ``"delta"`` (each is a
            frozen base, the ``base`` buffer, plus a generated delta that starts at exactly 0:
            the default generator's output layer starts at zero) or ``"lora"`` (LoRA adapters on
            a frozen copy of the target: this returns a
            :class:`~hypernn_gen.runtime.lora_torch.TorchLoRAHyperNetwork`, which takes the
            ``lora_*`` keywords).
        base: ``"delta"``: a checkpoint path (safetensors or torch) or state dict holding the
            base values (default: the target's own).
        gradient_scaling: ``"on"`` (default): gradient multipliers (forward values unchanged)
            that let the target's own optimizer and learning rate train the hypernetwork: the
            decode's scale and shift of each tensor, and the default embedding table and linear
            generator (see :func:`hypernn_gen.design.gradient_multipliers`); ``"off"``: raw
            gradients.
        batch_norm_stats: dynamic mode, a BatchNorm in training: ``"batch"`` (default:
            conditional BatchNorm, the whole batch's statistics as the plain target on the
            batch, each sample's own weight and bias; the running statistics move as the
            target's would) or ``"sample"`` (each sample normalised by its own statistics).

    The keyword names are the CLI's flags and the ``[tool.hypernn-gen]`` keys, with ``_``.

    ``forward(*inputs, generated_params=None, condition=None, **kwargs)`` returns
    ``(output, generated_params)``; ``generated_params`` is the flat vector of the target's
    generated tensors in layout order, ``(flat_size,)`` or ``(batch, flat_size)``.
    """

    def __new__(cls, *args: Any, generate: str = "weights", **kwargs: Any) -> Any:
        if generate != "lora" or cls is not TorchHyperNetwork:
            return super().__new__(cls)
        from .lora_torch import TorchLoRAHyperNetwork

        flat_only = {"num_embeddings", "chunk_dim", "chunking", "init_scheme"}
        given = [
            k
            for k in ("embedding_module_constructor", "weight_generator_constructor")
            if k in kwargs
        ]
        given += sorted(flat_only & kwargs.keys())
        if len(args) > 1 or given:
            what = given[0] if given else "positional constructors or sizes"
            raise HyperNetworkError(
                f'{what} shapes the chunked weight generator, which generate="lora" does not '
                "use; pass the target and keywords (lora_rank=..., embedding_dim=...)"
            )
        return TorchLoRAHyperNetwork(*args, **kwargs)

    def __init__(
        self,
        target_network: nn.Module,
        embedding_module_constructor: Callable[[int, int], nn.Module] | None = None,
        weight_generator_constructor: Callable[[int, int], nn.Module] | None = None,
        embedding_dim: int = 32,
        num_embeddings: int | None = None,
        *,
        chunk_dim: int | None = None,
        mode: Mode = "static",
        chunking: str = "auto",
        generator_hidden: Sequence[int] = (),
        init_scheme: str = "target",
        condition_shape: Sequence[int] | None = None,
        condition_dim: int | None = None,
        embedding_hidden: Sequence[int] = (64,),
        include: Callable[[str], bool] | None = None,
        generate: str = "weights",
        base: Any = None,
        gradient_scaling: str = "on",
        batch_norm_stats: str = "batch",
        generator_groups: str = "one",
    ) -> None:
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise HyperNetworkError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        if generate not in GENERATES:
            raise HyperNetworkError(f"generate must be one of {GENERATES}, got {generate!r}")
        if base is not None and generate != "delta":
            raise HyperNetworkError('base= applies to generate="delta" or "lora" only')
        if generate == "delta" and weight_generator_constructor is not None:
            raise HyperNetworkError(
                'generate="delta" starts every delta at exactly 0 by zeroing the default weight '
                "generator's output layer; drop weight_generator_constructor"
            )
        self.generates = generate
        if gradient_scaling not in GRADIENT_SCALINGS:
            raise HyperNetworkError(
                f"gradient_scaling must be 'on' or 'off', got {gradient_scaling!r}"
            )
        if batch_norm_stats not in BATCH_NORM_STATS:
            raise HyperNetworkError(
                f"batch_norm_stats must be 'batch' or 'sample', got {batch_norm_stats!r}"
            )
        self.mode: Mode = mode
        layout = trace_module(target_network, include=include)
        if mode == "dynamic":
            check_dynamic_support(target_network, layout)
        self.layout: Layout
        self.layout, self.chunking = design_layout(
            layout,
            num_embeddings=num_embeddings,
            chunk_dim=chunk_dim,
            chunking=chunking,
            init_scheme=init_scheme,
        )
        if generate == "delta":
            self.layout = delta_layout(self.layout)
        if condition_shape is not None:
            condition_dim = math.prod(condition_shape)
        self.embedding_dim = embedding_dim
        self.num_embeddings = self.chunking.num_embeddings
        self.hidden_dim = self.chunking.chunk_dim

        if embedding_module_constructor is None:
            if mode == "dynamic":
                self.embedding_module = DynamicEmbedding(
                    embedding_dim, self.num_embeddings, condition_dim, embedding_hidden
                )
            else:
                self.embedding_module = StaticEmbedding(embedding_dim, self.num_embeddings)
        else:
            self.embedding_module = embedding_module_constructor(embedding_dim, self.num_embeddings)
        generator_hidden = check_hidden(tuple(generator_hidden), "generator_hidden")
        #: grouped generator: per group, its chunks and its multipliers (None: one generator)
        self.generator_rows = self.group_scale = None
        self.normalize = generator_groups == "std"
        if generator_groups not in GENERATOR_GROUPS:
            raise HyperNetworkError(
                f"generator_groups must be 'one' or 'std', got {generator_groups!r}"
            )
        if self.normalize:
            self._check_groups(weight_generator_constructor, generator_hidden, generate)
            self.generator_rows = group_rows(self.layout, self.chunking)
            if gradient_scaling == "on":
                self.group_scale = group_gradient_multipliers(
                    self.layout, self.chunking, embedding_dim
                )
            self.weight_generator = GroupedLinearWeightGenerator(
                embedding_dim, self.hidden_dim, self.generator_rows, self.group_scale
            )
        elif weight_generator_constructor is not None:
            self.weight_generator = weight_generator_constructor(embedding_dim, self.hidden_dim)
        elif generator_hidden:
            self.weight_generator = MLPWeightGenerator(
                embedding_dim, self.hidden_dim, generator_hidden
            )
        else:
            self.weight_generator = LinearWeightGenerator(embedding_dim, self.hidden_dim)
        for name, module in (
            ("embedding", self.embedding_module),
            ("weight generator", self.weight_generator),
        ):
            if not isinstance(module, nn.Module):
                raise HyperNetworkError(
                    f"the {name} constructor returned {type(module).__name__}, not an nn.Module; "
                    f"subclass Torch{'EmbeddingModule' if name == 'embedding' else 'WeightGenerator'}"
                )

        generated = self.layout.generated
        #: the multipliers of the table, the generator's weight and bias (None: off)
        self.gradient_scale = layout_gradient_multipliers(
            self.layout, self.chunking, embedding_dim, gradient_scaling
        )
        if self.group_scale is not None:
            self.embedding_module.register_buffer(
                "row_scale", row_factors(self.generator_rows, self.group_scale), persistent=False
            )
        elif self.gradient_scale is not None:
            if isinstance(self.embedding_module, StaticEmbedding | DynamicEmbedding):
                self.embedding_module.gradient_scale = self.gradient_scale[0]
            if isinstance(self.weight_generator, LinearWeightGenerator):
                self.weight_generator.gradient_scale = self.gradient_scale[1:]
        self.param_scale = nn.Parameter(torch.tensor([t.init_std for t in generated]))
        self.param_shift = nn.Parameter(torch.tensor([t.init_mean for t in generated]))
        paths = {t.path for t in generated} | {".".join(a) for t in generated for a in t.aliases}
        if generate == "delta":
            target_network = self._init_delta(target_network, base)
        self.target = without_generated(target_network, paths)
        set_batch_norm_statistics(self.target, batch_norm_stats)
        #: saved in every state dict (``layout_digest``) and checked on load, as generated files do
        self.checkpoint_digest = checkpoint_digest(self.layout, self.chunking, mode, embedding_dim)
        carry_digest(self, self.checkpoint_digest)

    def _init_delta(self, target_network: nn.Module, base: Any) -> nn.Module:
        """``generate="delta"``: zero the generator's output layer and keep the base values as the
        ``base`` buffer (from ``base`` when given, else the target's own)."""
        from .lora_torch import base_state

        zero_output(self.weight_generator)
        generated = self.layout.generated
        if base is not None:
            target_network = copy.deepcopy(target_network)
            try:
                apply_base(target_network, base_state(base), [t.path for t in generated])
            except ValueError as exc:
                raise HyperNetworkError(str(exc)) from None
        values = dict(target_network.named_parameters())
        flat = flatten_params(values, generated, self.layout.flat_size)
        self.register_buffer("base", flat.detach().clone())
        return target_network

    # -- generation ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.param_scale.device

    def embed(self, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding module's output for this mode."""
        if self.mode == "static":
            return self.embedding_module()
        if condition is None:
            raise HyperNetworkError(
                "dynamic mode needs a conditioning input: pass the target's inputs or condition=..."
            )
        return self.embedding_module(condition)

    def generate_params(self, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The flat vector of generated parameters: ``(flat_size,)`` or ``(batch, flat_size)``."""
        embedding = self.embed(condition)
        if not isinstance(embedding, torch.Tensor):
            raise HyperNetworkError(
                f"the embedding module returned {type(embedding).__name__}, expected a tensor of "
                f"shape {self._expected_embedding(condition)}"
            )
        raw = self.weight_generator(embedding)
        if not isinstance(raw, torch.Tensor):
            raise HyperNetworkError(
                f"the weight generator returned {type(raw).__name__}, expected a tensor of chunks "
                f"(..., {self.num_embeddings}, {self.hidden_dim})"
            )
        if self.mode == "dynamic":
            batch = condition.shape[0]
            if raw.dim() == 0 or raw.numel() % batch:
                raise HyperNetworkError(
                    f"the weight generator returned shape {tuple(raw.shape)}, which does not split "
                    f"into {batch} samples; keep the batch dimension first"
                )
            raw = raw.reshape(batch, -1)
        else:
            raw = raw.reshape(-1)
        if raw.shape[-1] < self.layout.flat_size:
            raise HyperNetworkError(
                f"the weight generator made {raw.shape[-1]} values per weight set, the target needs "
                f"{self.layout.flat_size}: return (num_embeddings={self.num_embeddings}, "
                f"hidden_dim={self.hidden_dim}) chunks from an embedding of shape "
                f"{self._expected_embedding(condition)}"
            )
        return self._decode(raw[..., : self.layout.flat_size])

    def _decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-tensor affine map from the raw vector to the target's parameters (the kernel's)."""
        layout = self.layout
        if self.normalize:
            raw = normalize_raw(raw, layout.generated, layout.flat_size)
        out = decode(
            raw,
            self.param_scale,
            self.param_shift,
            layout.generated,
            layout.flat_size,
            self.gradient_scale,
        )
        return out + self.base if self.generates == "delta" else out

    def _check_groups(self, constructor: Any, hidden: tuple, generate: str) -> None:
        """``generator_groups="std"``: the default linear generator on tensor-aligned chunks."""
        if constructor is not None or hidden or generate != "weights":
            raise HyperNetworkError(
                'generator_groups="std" builds its own linear heads: drop '
                "weight_generator_constructor, generator_hidden and generate"
            )
        if any(t.offset % self.hidden_dim for t in self.layout.generated):
            raise HyperNetworkError(
                'generator_groups="std" needs every tensor on its own chunks: pass '
                'chunking="tensor" (the default "auto" is, without num_embeddings/chunk_dim)'
            )

    def _expected_embedding(self, condition: Any) -> tuple[int, ...]:
        shape = (self.num_embeddings, self.embedding_dim)
        if self.mode == "dynamic" and isinstance(condition, torch.Tensor):
            return (condition.shape[0], *shape)
        return shape

    # -- flat vector <-> tensors --------------------------------------------------------------

    def unflatten_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors (state-dict names) from a flat vector; keeps any leading batch dims."""
        return unflatten_params(flat, self.layout.generated, self.layout.flat_size)

    def flatten_params(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector for named tensors (the inverse of :meth:`unflatten_params`)."""
        generated = self.layout.generated
        missing = [t.path for t in generated if t.path not in params]
        if missing:
            raise HyperNetworkError(
                f"flatten_params is missing {missing[0]!r} (and {len(missing) - 1} more); pass "
                "every generated tensor, e.g. dict(target.named_parameters())"
            )
        return flatten_params(dict(params), generated, self.layout.flat_size)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        *args: Any,
        generated_params: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Any, torch.Tensor]:
        """Run the target with generated weights; returns ``(output, generated_params)``."""
        if generated_params is None:
            if self.mode == "dynamic" and condition is None:
                condition = _first_tensor(args)
            generated_params = self.generate_params(condition)
        self._check_params(generated_params)
        return self.target_forward(*args, generated_params=generated_params, **kwargs), (
            generated_params
        )

    def target_forward(self, *args: Any, generated_params: torch.Tensor, **kwargs: Any) -> Any:
        """The target's forward with the given flat weights (one set, or one per sample)."""
        params = self.unflatten_params(generated_params)
        for t in self.layout.generated:  # tied weights: every name the target uses gets the tensor
            for alias in t.aliases:
                params[".".join(alias)] = params[t.path]
        if self.mode == "static":
            return functional_call(self.target, params, args, kwargs, tie_weights=False)
        return self._per_sample_forward(params, generated_params.shape[0], args, kwargs)

    def _per_sample_forward(
        self, params: dict[str, torch.Tensor], batch: int, args: tuple, kwargs: dict
    ) -> Any:
        """Sample b through the target alone with weight set b, batched with ``vmap``.

        In training mode the target's buffers are given to each sample as its own copy (BatchNorm
        then sees that sample's statistics) and the copies' mean is written back afterwards.
        """
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != batch):
                raise HyperNetworkError(
                    f"dynamic mode made {batch} weight sets but input {i} has batch size "
                    f"{a.shape[0] if a.dim() else 'none (a scalar)'}; give the target inputs and "
                    "the condition the same leading batch dimension"
                )
        return run_per_sample(self.target, params, batch, args, kwargs)

    def _check_params(self, flat: torch.Tensor) -> None:
        n = self.layout.flat_size
        expected = (n,) if self.mode == "static" else ("batch", n)
        ok = flat.shape[-1] == n and flat.dim() == len(expected)
        if not ok:
            raise HyperNetworkError(
                f"generated_params has shape {tuple(flat.shape)}, expected {expected} for this "
                f"{self.mode} hypernetwork; build it with flatten_params()"
            )

    # -- persistence (hyper-nn compatible) ----------------------------------------------------

    def save(self, path: str) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, weights_only=True))


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


# ``inspect.signature(TorchHyperNetwork)`` shows ``__init__``'s keywords, not ``__new__``'s
# dispatch to the LoRA class (``generate="lora"``).
TorchHyperNetwork.__signature__ = inspect.signature(TorchHyperNetwork.__init__).replace(
    parameters=list(inspect.signature(TorchHyperNetwork.__init__).parameters.values())[1:]
)
