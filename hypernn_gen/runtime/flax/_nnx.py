"""Hypernetworks for Flax NNX targets.

    hn = NNXHyperNetwork(target, rngs=nnx.Rngs(0))              # static, sensible defaults
    output, generated_params = hn(x)

    hn = NNXHyperNetwork(target, mode="dynamic", condition_dim=64, rngs=nnx.Rngs(0))
    output, generated_params = hn(x)                             # one weight set per sample

The hypernetwork keeps a copy of the target as ``hn.target`` in which every generated
``nnx.Param`` is replaced by an empty :class:`GeneratedSlot` placeholder, so
``nnx.state(hn, nnx.Param)`` holds only the hypernetwork's own parameters, while the target's
other state (``BatchStat``, Dropout ``RngKey``/``RngCount``, ...) is real state of the
hypernetwork: updated in training, frozen in eval, and ``hn.train()``/``hn.eval()`` reach the
target's BatchNorm/Dropout. Each call splits that copy, merges it with Params made from the
generated weights, runs it and keeps the updated state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ...adapters import delta_layout
from ...design import check_hidden, design_layout
from ...errors import HyperNetworkError
from ...kernel import flax as fk
from ...kernel import nnx as nk
from ...kernel.nnx import GeneratedSlot
from ...layout import Chunking, Layout, checkpoint_digest
from ...trace_flax import trace_nnx_module
from . import _common as c

__all__ = [
    "GeneratedSlot",
    "NNXDynamicEmbedding",
    "NNXEmbeddingModule",
    "NNXHyperNetwork",
    "NNXGroupedLinearWeightGenerator",
    "NNXLinearWeightGenerator",
    "NNXMLPWeightGenerator",
    "NNXStaticEmbedding",
    "NNXWeightGenerator",
]


class NNXEmbeddingModule(nnx.Module):
    """Base class of embedding modules: ``__call__()`` (static) or ``__call__(condition)`` (dynamic).

    Return ``(num_embeddings, embedding_dim)`` in static mode and
    ``(batch, num_embeddings, embedding_dim)`` in dynamic mode.
    """

    def __init__(self, embedding_dim: int, num_embeddings: int, *, rngs: nnx.Rngs | None = None):
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings


class NNXWeightGenerator(nnx.Module):
    """Base class of weight generators: ``__call__(embedding)`` -> ``(..., num_embeddings, hidden_dim)``.

    ``hidden_dim`` is the chunk size; returning the chunks flattened (keeping a dynamic batch
    dimension first) is accepted too.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, *, rngs: nnx.Rngs | None = None):
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim


class NNXStaticEmbedding(NNXEmbeddingModule):
    """A learned table ``weight`` ``(num_embeddings, embedding_dim)``, entries ~ N(0, 1).

    ``gradient_scale``: the multiplier of the table's gradient (``None``: none), set by
    :class:`NNXHyperNetwork` with gradient scaling on.
    """

    gradient_scale: float | None = None

    def __init__(self, embedding_dim: int, num_embeddings: int, *, rngs: nnx.Rngs):
        super().__init__(embedding_dim, num_embeddings)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, embedding_dim)))

    def __call__(self) -> jax.Array:
        return nk.scale_grad(self.weight[...], c.table_scale(self.gradient_scale))


class NNXDynamicEmbedding(NNXEmbeddingModule):
    """The learned table, scaled per sample: ``E[b, k] = (1 + m(c_b)[k]) * weight[k]``.

    ``m`` (``modulation``) is an MLP of the flattened condition ``(batch, condition_dim)``:
    Linear layers of widths ``embedding_hidden`` with ReLU, then Linear(num_embeddings) whose
    kernel starts at a tenth of lecun_normal and bias at zero. NNX layers need
    ``condition_dim`` up front. ``gradient_scale``: as in :class:`NNXStaticEmbedding`.
    """

    gradient_scale: float | None = None

    def __init__(
        self,
        embedding_dim: int,
        num_embeddings: int,
        condition_dim: int | None = None,
        embedding_hidden: tuple[int, ...] = (64,),
        *,
        rngs: nnx.Rngs,
    ):
        super().__init__(embedding_dim, num_embeddings)
        if condition_dim is None:
            raise HyperNetworkError(
                "dynamic mode with the default embedding needs condition_dim: pass "
                "condition_dim=<values in one conditioning input> (e.g. prod(x.shape[1:]))"
            )
        self.condition_dim = condition_dim
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, embedding_dim)))
        lecun = nnx.initializers.lecun_normal()

        def last_init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
            return 0.1 * lecun(key, shape, dtype)

        layers: list[Any] = []
        width = condition_dim
        for hidden in check_hidden(tuple(embedding_hidden), "embedding_hidden"):
            layers += [nnx.Linear(width, hidden, rngs=rngs), nnx.relu]
            width = hidden
        self.modulation = nnx.Sequential(
            *layers, nnx.Linear(width, num_embeddings, kernel_init=last_init, rngs=rngs)
        )

    def scales(self, condition: jax.Array) -> jax.Array:
        """Per-sample scale of each embedding, ``(batch, num_embeddings)``."""
        flat = condition.reshape(condition.shape[0], -1).astype(self.weight.dtype)
        if flat.shape[-1] != self.condition_dim:
            raise HyperNetworkError(
                f"the condition has {flat.shape[-1]} values per sample, the embedding was built "
                f"for condition_dim={self.condition_dim}; pass condition_dim={flat.shape[-1]}"
            )
        return 1.0 + self.modulation(flat)

    def __call__(self, condition: jax.Array) -> jax.Array:
        return self.scales(condition)[..., None] * nk.scale_grad(
            self.weight[...], c.table_scale(self.gradient_scale)
        )


class NNXLinearWeightGenerator(NNXWeightGenerator):
    """One linear map (``linear``) from an embedding to a chunk; kernel ~ N(0, 1/embedding_dim).

    ``model_axis``: a mesh axis to split the output dimension (``hidden_dim``) over: kernel and
    bias get ``nnx.with_partitioning`` metadata ``(None, model_axis)``/``(model_axis,)`` (built
    under ``jax.set_mesh(mesh)``: created split) and the output is constrained to that split;
    without a mesh only the metadata is kept. ``None`` (default): no annotation.
    ``linear`` is an :class:`~hypernn_gen.kernel.nnx.ScaledLinear`: its ``gradient_scale``
    (the kernel's and bias's gradient multipliers) is set by :class:`NNXHyperNetwork`.
    ``zero_output``: the kernel starts at zero too (``generate="delta"``: every delta starts at
    exactly 0).
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int,
        *,
        model_axis: str | None = None,
        zero_output: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(embedding_dim, hidden_dim)
        init = (
            nnx.initializers.zeros_init()
            if zero_output
            else nnx.initializers.normal(1.0 / math.sqrt(embedding_dim))
        )
        bias_init = nnx.initializers.zeros_init()
        if model_axis is not None:
            eager = c.model_mesh(model_axis, hidden_dim) is not None
            init = nnx.with_partitioning(init, (None, model_axis), eager_sharding=eager)
            bias_init = nnx.with_partitioning(bias_init, (model_axis,), eager_sharding=eager)
        self.model_axis = model_axis
        self.linear = nk.ScaledLinear(
            embedding_dim, hidden_dim, kernel_init=init, bias_init=bias_init, rngs=rngs
        )

    def __call__(self, embedding: jax.Array) -> jax.Array:
        raw = self.linear(embedding)
        if self.model_axis is None or c.model_mesh(self.model_axis, self.hidden_dim) is None:
            return raw
        return c.split_chunks(raw, self.model_axis)


class NNXGroupedLinearWeightGenerator(NNXWeightGenerator):
    """One linear head per group of chunks (``generator_groups="std"``): chunk ``k`` is made by
    the head of the group whose ``rows`` hold it (:func:`hypernn_gen.design.group_rows`), each
    head initialised as :class:`NNXLinearWeightGenerator`'s. ``kernel (G, D, C)``, ``bias (G,
    C)``; ``gradient_scale``: per group, the table's, kernel's and bias's multipliers (the
    table's are applied by the embedding module)."""

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int,
        rows: tuple[tuple[int, ...], ...],
        gradient_scale: tuple | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        super().__init__(embedding_dim, hidden_dim)
        self.rows, self.gradient_scale = rows, gradient_scale
        init = nnx.initializers.normal(1.0 / math.sqrt(embedding_dim))
        self.kernel = nnx.Param(init(rngs.params(), (len(rows), embedding_dim, hidden_dim)))
        self.bias = nnx.Param(jnp.zeros((len(rows), hidden_dim), jnp.float32))

    def __call__(self, embedding: jax.Array) -> jax.Array:
        return fk.grouped_linear(
            embedding, self.kernel[...], self.bias[...], self.rows, self.gradient_scale
        )


class NNXMLPWeightGenerator(NNXWeightGenerator):
    """An MLP (``layers``) from an embedding to a chunk: widths ``generator_hidden`` with ReLU,
    He-normal kernels, then a kernel ~ N(0, 1/width); zero biases, so the output has unit
    variance at init. Not linear: nothing can be fused in dynamic mode. ``zero_output``: the
    last kernel starts at zero (``generate="delta"``)."""

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int,
        generator_hidden: tuple[int, ...] = (64,),
        *,
        zero_output: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(embedding_dim, hidden_dim)
        layers: list[Any] = []
        width = embedding_dim
        for hidden in check_hidden(tuple(generator_hidden), "generator_hidden"):
            init = nnx.initializers.normal(math.sqrt(2.0 / width))
            layers += [nnx.Linear(width, hidden, kernel_init=init, rngs=rngs), nnx.relu]
            width = hidden
        init = (
            nnx.initializers.zeros_init()
            if zero_output
            else nnx.initializers.normal(1.0 / math.sqrt(width))
        )
        self.layers = nnx.Sequential(
            *layers, nnx.Linear(width, hidden_dim, kernel_init=init, rngs=rngs)
        )

    def __call__(self, embedding: jax.Array) -> jax.Array:
        return self.layers(embedding)


class NNXHyperNetwork(nnx.Module):
    """A hypernetwork for the NNX module ``target``: its ``nnx.Param`` variables are generated.

    Args:
        target: a live ``nnx.Module``. It is copied (its Params replaced by empty
            :class:`GeneratedSlot` placeholders, its other state copied); the original is untouched.
        embedding_module_constructor: ``(embedding_dim, num_embeddings, rngs=rngs) ->
            NNXEmbeddingModule``. Default: :class:`NNXStaticEmbedding` or
            :class:`NNXDynamicEmbedding` by ``mode``.
        weight_generator_constructor: ``(embedding_dim, hidden_dim, rngs=rngs) ->
            NNXWeightGenerator``. Default: :class:`NNXLinearWeightGenerator`.
        embedding_dim, num_embeddings, chunk_dim, mode, chunking, generator_hidden, init_scheme,
            condition_shape, condition_dim, embedding_hidden, include: as in
            :class:`~hypernn_gen.runtime.torch.TorchHyperNetwork` (the CLI's option names);
            params ``include`` rejects stay ``nnx.Param`` of ``hn.target`` (trained directly).
        model_axis: a mesh axis to split the default weight generator's output over (see
            :class:`NNXLinearWeightGenerator`); ``None`` (default): not split.
        gradient_scaling: ``"on"`` (default): gradient multipliers (forward values unchanged)
            that let the target's own optimizer and learning rate train the hypernetwork: the
            decode's scale and shift of each tensor, and the default embedding table and linear
            generator (see :func:`hypernn_gen.design.gradient_multipliers`); ``"off"``: raw
            gradients.
        generator_groups: ``"one"`` (default): one linear generator for every chunk;
            ``"std"``: one linear head per group of tensors of similar init std
            (:class:`NNXGroupedLinearWeightGenerator`, :func:`hypernn_gen.design.std_groups`),
            each group's multipliers its own, each tensor's raw values brought to unit RMS
            before the decode (tensor-aligned chunks; not with a custom or hidden-layer
            generator, ``generate="delta"`` or ``model_axis``).
        batch_norm_stats: dynamic mode, BatchNorm in training mode: ``"batch"`` (default:
            statistics over the whole batch, each sample's own scale and bias) or ``"sample"``
            (each sample by its own statistics, as a batch of one).
        generate: ``"weights"`` (default: the generated tensors are the target's) or
            ``"delta"`` (each is a frozen base plus a generated delta that starts at exactly 0:
            the default generator's output layer starts at zero; the twin of a
            ``--generate delta`` file). LoRA: :class:`~hypernn_gen.runtime.flax.lora.NNXLoRAHyperNetwork`.
        base: ``"delta"``: the base values, ``self.base`` (an ``nnx.Variable``, not an
            ``nnx.Param``: nothing trains it): a msgpack checkpoint path or
            ``nnx.to_pure_dict(nnx.state(model))``; ``None`` (default): the target's current values.
        rngs: initialises the embedding and the generator.

    ``hn(*inputs, generated_params=None, condition=None, **kwargs)`` returns
    ``(output, generated_params)``, the flat vector ``(flat_size,)`` or ``(batch, flat_size)``.
    """

    def __init__(
        self,
        target: nnx.Module,
        embedding_module_constructor: Callable[..., nnx.Module] | None = None,
        weight_generator_constructor: Callable[..., nnx.Module] | None = None,
        embedding_dim: int = 32,
        num_embeddings: int | None = None,
        *,
        chunk_dim: int | None = None,
        mode: str = "static",
        chunking: str = "auto",
        generator_hidden: tuple[int, ...] = (),
        init_scheme: str = "target",
        condition_shape: tuple[int, ...] | None = None,
        condition_dim: int | None = None,
        embedding_hidden: tuple[int, ...] = (64,),
        include: Callable[[str], bool] | None = None,
        model_axis: str | None = None,
        gradient_scaling: str = "on",
        batch_norm_stats: str = "batch",
        generate: str = "weights",
        base: Any = None,
        generator_groups: str = "one",
        rngs: nnx.Rngs,
    ):
        if mode not in ("static", "dynamic"):
            raise HyperNetworkError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        c.check_batch_norm_stats(batch_norm_stats)
        delta = c.check_generate(generate, base, weight_generator_constructor)
        self.mode = mode
        self.batch_norm_stats = batch_norm_stats
        self.layout: Layout
        self.chunking: Chunking
        self.layout, self.chunking = c.traced(
            lambda: design_layout(
                trace_nnx_module(target, include=include),
                num_embeddings=num_embeddings,
                chunk_dim=chunk_dim,
                chunking=chunking,
                init_scheme=init_scheme,
            )
        )
        if delta:
            self.layout = delta_layout(self.layout)
        self.embedding_dim = embedding_dim
        self.num_embeddings = self.chunking.num_embeddings
        self.hidden_dim = self.chunking.chunk_dim

        if embedding_module_constructor is None:
            if mode == "dynamic":
                embedding_module_constructor = functools.partial(
                    NNXDynamicEmbedding,
                    condition_dim=c.condition_dim(condition_shape, condition_dim),
                    embedding_hidden=tuple(embedding_hidden),
                )
            else:
                embedding_module_constructor = NNXStaticEmbedding
        if model_axis is not None and weight_generator_constructor is not None:
            raise HyperNetworkError(c.MODEL_AXIS_CUSTOM)
        if model_axis is not None and generator_hidden:
            raise HyperNetworkError(c.MODEL_AXIS_HIDDEN)
        groups = c.generator_groups(
            generator_groups,
            self.layout,
            self.chunking,
            embedding_dim,
            gradient_scaling,
            weight_generator_constructor,
            tuple(generator_hidden),
            generate,
        )
        #: ``generator_groups="std"``: per group its chunks and multipliers; each tensor's raw
        #: values normalised before the decode
        self.generator_rows, self.group_scale = groups or (None, None)
        self.normalize = groups is not None
        if groups is not None and model_axis is not None:
            raise HyperNetworkError(
                'generator_groups="std" cannot split its heads: drop model_axis'
            )
        if groups is not None:
            weight_generator_constructor = functools.partial(
                NNXGroupedLinearWeightGenerator,
                rows=self.generator_rows,
                gradient_scale=self.group_scale,
            )
        if weight_generator_constructor is None and generator_hidden:
            weight_generator_constructor = functools.partial(
                NNXMLPWeightGenerator, generator_hidden=tuple(generator_hidden), zero_output=delta
            )
        if weight_generator_constructor is None:
            weight_generator_constructor = functools.partial(
                NNXLinearWeightGenerator, model_axis=model_axis, zero_output=delta
            )
        self.embedding_module = embedding_module_constructor(
            embedding_dim, self.num_embeddings, rngs=rngs
        )
        self.weight_generator = weight_generator_constructor(
            embedding_dim, self.hidden_dim, rngs=rngs
        )
        for name, module, kind in (
            ("embedding", self.embedding_module, "NNXEmbeddingModule"),
            ("weight generator", self.weight_generator, "NNXWeightGenerator"),
        ):
            if not isinstance(module, nnx.Module):
                raise HyperNetworkError(
                    f"the {name} constructor returned {type(module).__name__}, not an nnx.Module; "
                    f"return an instance of a {kind} subclass"
                )

        #: the multipliers of the table, the generator's weight and bias (None: off)
        self.gradient_scale = c.gradient_scale(
            self.layout, self.chunking, embedding_dim, gradient_scaling
        )
        if self.group_scale is not None:
            rows = fk.row_factors(self.generator_rows, self.group_scale)
            self.embedding_module.gradient_scale = tuple(float(f) for f in rows[:, 0])
        elif self.gradient_scale is not None:
            if isinstance(self.embedding_module, NNXStaticEmbedding | NNXDynamicEmbedding):
                self.embedding_module.gradient_scale = self.gradient_scale[0]
            if isinstance(self.weight_generator, NNXLinearWeightGenerator):
                self.weight_generator.linear.gradient_scale = self.gradient_scale[1:]
        generated = self.layout.generated
        self.param_scale = nnx.Param(jnp.array([t.init_std for t in generated], jnp.float32))
        self.param_shift = nnx.Param(jnp.array([t.init_mean for t in generated], jnp.float32))
        #: saved in the state (``layout_digest``) and checked at every call, as generated files do
        self.checkpoint_digest = checkpoint_digest(self.layout, self.chunking, mode, embedding_dim)
        self.layout_digest = nnx.Variable(nk.digest_array(self.checkpoint_digest))
        #: ``generate="delta"``: the frozen base (an nnx.Variable, not an nnx.Param); else None
        self.base: nnx.Variable | None = (
            nnx.Variable(
                fk.base_flat(
                    nnx.state(target, nnx.Param),
                    base,
                    generated,
                    self.layout.flat_size,
                    None,
                    HyperNetworkError,
                )
            )
            if delta
            else None
        )
        self.target = nk.without_generated(target, self.layout.generated)

    # -- generation ---------------------------------------------------------------------------

    def embed(self, condition: jax.Array | None = None) -> jax.Array:
        """The embedding module's output for this mode."""
        if self.mode == "static":
            return self.embedding_module()
        c.condition_batch(condition)
        return self.embedding_module(condition)

    def generate_params(self, condition: jax.Array | None = None) -> jax.Array:
        """The flat vector of generated parameters: ``(flat_size,)`` or ``(batch, flat_size)``."""
        batch = c.condition_batch(condition) if self.mode == "dynamic" else None
        n, d, h = self.num_embeddings, self.embedding_dim, self.hidden_dim
        embedding = self.embed(condition)
        c.check_embedding(embedding, batch, n, d)
        expected = (n, d) if batch is None else (batch, n, d)
        raw = c.raw_vector(
            self.layout, self.weight_generator(embedding), batch, n, h, str(expected)
        )
        if self.normalize:
            raw = fk.normalized(raw, self.layout.generated, self.layout.flat_size)
        scale, shift = self.param_scale[...], self.param_shift[...]
        flat = c.decode(self.layout, raw, scale, shift, self.gradient_scale)
        return flat if self.base is None else self.base[...] + flat

    # -- flat vector <-> tensors --------------------------------------------------------------

    def unflatten_params(self, flat: jax.Array) -> dict:
        """Nested dict (``nnx.state`` paths) of the generated tensors; keeps leading batch dims."""
        return c.unflatten_params(self.layout, flat)

    def flatten_params(self, params: Any) -> jax.Array:
        """The flat vector for ``nnx.state(target, nnx.Param)``, a pure dict, or a target module."""
        if isinstance(params, nnx.Module):
            params = nnx.state(params, nnx.Param)
        return c.flatten_params(self.layout, params)

    # -- forward ------------------------------------------------------------------------------

    def __call__(
        self,
        *inputs: Any,
        generated_params: jax.Array | None = None,
        condition: jax.Array | None = None,
        **kwargs: Any,
    ) -> tuple[Any, jax.Array]:
        """Run the target with generated weights; returns ``(output, generated_params)``."""
        nk.check_digest(self.layout_digest[...], self.checkpoint_digest, HyperNetworkError)
        batch = None
        if self.mode == "dynamic":
            if condition is None:
                condition = c.first_array(inputs)
            batch = c.condition_batch(condition)
            c.check_batch(inputs, batch)
        if generated_params is None:
            generated_params = self.generate_params(condition)
        c.check_flat(self.layout, generated_params, self.mode)
        params = self.unflatten_params(generated_params)
        if batch is None:
            out = nk.run_target(self.target, params, inputs, kwargs)
        else:
            out = nk.run_per_sample(
                self.target, params, inputs, kwargs, stats=self.batch_norm_stats
            )
        return out, generated_params
