"""Hypernetworks for Flax Linen targets (hyper-nn vocabulary).

    hn = FlaxHyperNetwork(target)                                # static, sensible defaults
    variables = hn.init(jax.random.key(0), x)
    output, generated_params = hn.apply(variables, x)

    hn = FlaxHyperNetwork(target, mode="dynamic")                # one weight set per sample
    output, generated_params = hn.apply(variables, x)           # generated_params (B, flat_size)

The target's ``params`` are made by the hypernetwork (see :mod:`hypernn_gen.layout` for the
contract); its other collections (``batch_stats``, ...) are variables of the hypernetwork under the
same collection name and the key ``target``, updated when the collection is mutable
(``hn.apply(..., mutable=["batch_stats"])``) and frozen otherwise, like the target's own. Rngs
given to ``apply`` (``rngs={"dropout": key}``) are passed on to the target.

A Linen target's shapes are only known from its inputs, so the layout is traced from the inputs
of each call (``jax.eval_shape``, cached per input shapes). The flat <-> tree helpers are
therefore module-level functions of a layout: ``flatten_params(hn.layout(x), params)`` and
``unflatten_params(hn.layout(x), flat)``; :meth:`FlaxHyperNetwork.layout` works unbound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...adapters import delta_layout
from ...design import check_hidden, design_layout
from ...errors import HyperNetworkError
from ...kernel import flax as fk
from ...kernel import linen as lk
from ...layout import Chunking, Layout, checkpoint_digest
from ...trace_flax import _array_inputs, trace_linen
from . import _common as c

__all__ = [
    "DynamicEmbedding",
    "FlaxEmbeddingModule",
    "FlaxHyperNetwork",
    "FlaxWeightGenerator",
    "GroupedLinearWeightGenerator",
    "LinearWeightGenerator",
    "MLPWeightGenerator",
    "StaticEmbedding",
]


def _scaled(init: Callable, factor: float) -> Callable:
    def scaled(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
        return factor * init(key, shape, dtype)

    return scaled


class FlaxEmbeddingModule(nn.Module):
    """Base class of embedding modules: ``__call__()`` (static) or ``__call__(condition)`` (dynamic).

    Return ``(num_embeddings, embedding_dim)`` in static mode and
    ``(batch, num_embeddings, embedding_dim)`` in dynamic mode.
    """

    embedding_dim: int
    num_embeddings: int


class FlaxWeightGenerator(nn.Module):
    """Base class of weight generators: ``__call__(embedding)`` -> ``(..., num_embeddings, hidden_dim)``.

    ``hidden_dim`` is the chunk size; returning the chunks flattened (keeping a dynamic batch
    dimension first) is accepted too.
    """

    embedding_dim: int
    hidden_dim: int


class StaticEmbedding(FlaxEmbeddingModule):
    """A learned table ``weight`` of ``num_embeddings`` vectors, entries ~ N(0, 1).

    ``gradient_scale``: the multiplier of the table's gradient (``None``: none), set by
    :class:`FlaxHyperNetwork` with gradient scaling on.
    """

    gradient_scale: float | tuple[float, ...] | None = None

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.num_embeddings, self.embedding_dim)
        weight = self.param("weight", nn.initializers.normal(1.0), shape)
        return lk.scale_grad(weight, c.table_scale(self.gradient_scale))


class DynamicEmbedding(FlaxEmbeddingModule):
    """The learned table, scaled per sample: ``E[b, k] = (1 + m(c_b)[k]) * weight[k]``.

    ``m`` (``modulation``) is an MLP of the flattened condition: Dense layers of widths
    ``embedding_hidden`` with ReLU, then Dense(num_embeddings) whose kernel starts at a tenth of
    lecun_normal and bias at zero. ``condition_dim`` is optional (Dense infers it); when
    given, the condition is checked. ``gradient_scale``: as in :class:`StaticEmbedding`.
    """

    condition_dim: int | None = None
    embedding_hidden: tuple[int, ...] = (64,)
    gradient_scale: float | tuple[float, ...] | None = None

    def setup(self) -> None:
        self.weight = self.param(
            "weight", nn.initializers.normal(1.0), (self.num_embeddings, self.embedding_dim)
        )
        last_init = _scaled(nn.initializers.lecun_normal(), 0.1)
        widths = check_hidden(tuple(self.embedding_hidden), "embedding_hidden")
        hidden = [layer for width in widths for layer in (nn.Dense(width), nn.relu)]
        self.modulation = nn.Sequential(
            [*hidden, nn.Dense(self.num_embeddings, kernel_init=last_init)]
        )

    def scales(self, condition: jax.Array) -> jax.Array:
        """Per-sample scale of each embedding, ``(batch, num_embeddings)``."""
        flat = condition.reshape(condition.shape[0], -1).astype(self.weight.dtype)
        if self.condition_dim is not None and flat.shape[-1] != self.condition_dim:
            raise HyperNetworkError(
                f"the condition has {flat.shape[-1]} values per sample, the embedding was built "
                f"for condition_dim={self.condition_dim}; pass condition_dim=None to infer it"
            )
        return 1.0 + self.modulation(flat)

    def __call__(self, condition: jax.Array) -> jax.Array:
        return self.scales(condition)[..., None] * lk.scale_grad(
            self.weight, c.table_scale(self.gradient_scale)
        )


class LinearWeightGenerator(FlaxWeightGenerator):
    """One linear map (``linear``) from an embedding to a chunk; unit-variance output at init.

    Kernel ~ N(0, 1/embedding_dim), zero bias. ``model_axis``: a mesh axis to split the output
    dimension (``hidden_dim``) over: kernel and bias are ``nn.with_partitioning``-annotated
    ``(None, model_axis)``/``(model_axis,)`` and, under ``jax.set_mesh``, the output is
    constrained to that split; ``None`` (default): no annotation. ``gradient_scale``: the
    multipliers of the kernel's and the bias's gradients (``None``: none), set by
    :class:`FlaxHyperNetwork` with gradient scaling on. ``zero_output``: the kernel starts at
    zero too (``generate="delta"``: every delta starts at exactly 0).
    """

    model_axis: str | None = None
    gradient_scale: tuple[float | None, float | None] = (None, None)
    zero_output: bool = False

    @nn.compact
    def __call__(self, embedding: jax.Array) -> jax.Array:
        init = (
            nn.initializers.zeros_init()
            if self.zero_output
            else nn.initializers.normal(1.0 / math.sqrt(self.embedding_dim))
        )
        scale = tuple(self.gradient_scale)
        if self.model_axis is None:
            return lk.ScaledDense(self.hidden_dim, scale, kernel_init=init, name="linear")(
                embedding
            )
        mesh = c.model_mesh(self.model_axis, self.hidden_dim)
        dense = lk.ScaledDense(
            self.hidden_dim,
            scale,
            kernel_init=nn.with_partitioning(init, (None, self.model_axis)),
            bias_init=nn.with_partitioning(nn.initializers.zeros_init(), (self.model_axis,)),
            name="linear",
        )
        raw = dense(embedding)
        return raw if mesh is None else c.split_chunks(raw, self.model_axis)


class GroupedLinearWeightGenerator(FlaxWeightGenerator):
    """One linear head per group of chunks (``generator_groups="std"``): chunk ``k`` is made by
    the head of the group whose ``rows`` hold it (:func:`hypernn_gen.design.group_rows`), each
    head initialised as :class:`LinearWeightGenerator`'s. ``kernel (G, D, C)``, ``bias (G,
    C)``; ``gradient_scale``: per group, the table's, kernel's and bias's multipliers (the
    table's are applied by the embedding module)."""

    rows: tuple[tuple[int, ...], ...] = ()
    gradient_scale: tuple | None = None

    @nn.compact
    def __call__(self, embedding: jax.Array) -> jax.Array:
        g, d, h = len(self.rows), self.embedding_dim, self.hidden_dim
        kernel = self.param("kernel", nn.initializers.normal(1.0 / math.sqrt(d)), (g, d, h))
        bias = self.param("bias", nn.initializers.zeros_init(), (g, h))
        return fk.grouped_linear(embedding, kernel, bias, self.rows, self.gradient_scale)


class MLPWeightGenerator(FlaxWeightGenerator):
    """An MLP from an embedding to a chunk: ``hidden_<i>`` (widths ``generator_hidden``,
    He-normal kernels, ReLU), then ``output`` (kernel ~ N(0, 1/width)); zero biases, so the
    output has unit variance at init. Not linear: nothing can be fused in dynamic mode.
    ``zero_output``: ``output``'s kernel starts at zero (``generate="delta"``).
    """

    generator_hidden: tuple[int, ...] = (64,)
    zero_output: bool = False

    @nn.compact
    def __call__(self, embedding: jax.Array) -> jax.Array:
        x, width = embedding, self.embedding_dim
        for i, hidden in enumerate(check_hidden(tuple(self.generator_hidden), "generator_hidden")):
            init = nn.initializers.normal(math.sqrt(2.0 / width))
            x = nn.relu(nn.Dense(hidden, kernel_init=init, name=f"hidden_{i}")(x))
            width = hidden
        init = (
            nn.initializers.zeros_init()
            if self.zero_output
            else nn.initializers.normal(1.0 / math.sqrt(width))
        )
        return nn.Dense(self.hidden_dim, kernel_init=init, name="output")(x)


class FlaxHyperNetwork(nn.Module):
    """A hypernetwork for the Linen module ``target_network``: its ``params`` are generated.

    Attributes:
        target_network: any ``flax.linen.Module`` (unbound).
        embedding_module_constructor: ``(embedding_dim, num_embeddings) -> FlaxEmbeddingModule``.
            Default: :class:`StaticEmbedding` or :class:`DynamicEmbedding` by ``mode``.
        weight_generator_constructor: ``(embedding_dim, hidden_dim) -> FlaxWeightGenerator``.
            Default: :class:`LinearWeightGenerator`.
        embedding_dim: size of each embedding.
        num_embeddings, chunk_dim: give one (or neither: both about ``sqrt(flat_size)``).
        mode: ``"static"`` (one weight set) or ``"dynamic"`` (one weight set per sample).
        chunking, generator_hidden, init_scheme, condition_shape, embedding_hidden: as in
            :class:`~hypernn_gen.runtime.torch.TorchHyperNetwork` (the CLI's option names).
        condition_dim: dynamic mode, default embedding: flattened size of one condition
            (``None``: inferred; ``condition_shape`` gives it too).
        include: predicate on dotted ``params`` paths; rejected parameters are ordinary
            parameters of the hypernetwork, under ``params["target"]``.
        model_axis: a mesh axis to split the default weight generator's output over (see
            :class:`LinearWeightGenerator`); ``None`` (default): not split.
        gradient_scaling: ``"on"`` (default): gradient multipliers (forward values unchanged)
            that let the target's own optimizer and learning rate train the hypernetwork: the
            decode's scale and shift of each tensor, and the default embedding table and linear
            generator (see :func:`hypernn_gen.design.gradient_multipliers`); ``"off"``: raw
            gradients.
        generator_groups: ``"one"`` (default): one linear generator for every chunk;
            ``"std"``: one linear head per group of tensors of similar init std
            (:class:`GroupedLinearWeightGenerator`, :func:`hypernn_gen.design.std_groups`),
            each group's multipliers its own, each tensor's raw values brought to unit RMS
            before the decode (tensor-aligned chunks; not with a custom or hidden-layer
            generator, ``generate="delta"`` or ``model_axis``).
        batch_norm_stats: dynamic mode, BatchNorm in training mode: ``"batch"`` (default:
            statistics over the whole batch, each sample's own scale and bias) or ``"sample"``
            (each sample by its own statistics, as a batch of one).
        generate: ``"weights"`` (default: the generated tensors are the target's) or
            ``"delta"`` (each is a frozen base plus a generated delta that starts at exactly 0:
            the default generator's output layer starts at zero; the twin of a
            ``--generate delta`` file). LoRA: :class:`~hypernn_gen.runtime.flax.lora.FlaxLoRAHyperNetwork`.
        base: ``"delta"``: the base values, ``variables["base"]["flat"]`` (made at init, never a
            param): a msgpack checkpoint path or variables (the variables or their ``params``);
            ``None`` (default): the target's own init.

    ``hn.apply(variables, *inputs, generated_params=None, condition=None, **target_kwargs)``
    returns ``(output, generated_params)``, the flat vector ``(flat_size,)`` (static) or
    ``(batch, flat_size)`` (dynamic). ``variables["params"]`` holds ``embedding_module``,
    ``weight_generator``, ``param_scale`` and ``param_shift`` (``(num_tensors,)``).
    """

    target_network: nn.Module
    embedding_module_constructor: Callable[[int, int], nn.Module] | None = None
    weight_generator_constructor: Callable[[int, int], nn.Module] | None = None
    embedding_dim: int = 32
    num_embeddings: int | None = None
    chunk_dim: int | None = None
    mode: str = "static"
    chunking: str = "auto"
    generator_hidden: tuple[int, ...] = ()
    init_scheme: str = "target"
    condition_shape: tuple[int, ...] | None = None
    condition_dim: int | None = None
    embedding_hidden: tuple[int, ...] = (64,)
    include: Callable[[str], bool] | None = None
    model_axis: str | None = None
    gradient_scaling: str = "on"
    batch_norm_stats: str = "batch"
    generate: str = "weights"
    base: Any = None
    generator_groups: str = "one"

    # -- layout -------------------------------------------------------------------------------

    def layout(self, *example_inputs: Any, **target_kwargs: Any) -> Layout:
        """The target's layout for these inputs, with measured init statistics and this
        hypernetwork's chunking and init scheme applied (works unbound).

        ``target_kwargs`` are the keyword arguments the target is called with (``train=...``).
        """
        return self.design(_measured_layout(self, example_inputs, target_kwargs, ()))[0]

    def design(self, layout: Layout) -> tuple[Layout, Chunking]:
        """The traced layout with the init scheme and chunking applied (``generate="delta"``:
        the delta's decode, :func:`~hypernn_gen.adapters.delta_layout`), and the chunking."""
        designed, chunking = c.traced(
            lambda: design_layout(
                layout,
                num_embeddings=self.num_embeddings,
                chunk_dim=self.chunk_dim,
                chunking=self.chunking,
                init_scheme=self.init_scheme,
            )
        )
        return (delta_layout(designed) if self.generate == "delta" else designed), chunking

    # -- forward ------------------------------------------------------------------------------

    @nn.compact
    def __call__(
        self,
        *inputs: Any,
        generated_params: jax.Array | None = None,
        condition: jax.Array | None = None,
        **target_kwargs: Any,
    ) -> tuple[Any, jax.Array]:
        """Run the target with generated weights; returns ``(output, generated_params)``."""
        if self.mode not in ("static", "dynamic"):
            raise HyperNetworkError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        c.check_batch_norm_stats(self.batch_norm_stats)
        delta = c.check_generate(self.generate, self.base, self.weight_generator_constructor)
        target = _detached(self.target_network)
        rng_names = [n for n in self.scope.rngs if n != "params"]
        initializing = self.is_initializing()
        # the init statistics: the decoder's start (init) and the gradient multipliers (always)
        # (and the groups of generator_groups="std")
        if initializing or self.gradient_scaling == "on" or self.generator_groups == "std":
            layout = _measured_layout(self, inputs, target_kwargs, tuple(rng_names))
        else:
            layout = _structure(target, inputs, target_kwargs, self.include, tuple(rng_names))
        layout, chunking = self.design(layout)
        grad_scale = c.gradient_scale(layout, chunking, self.embedding_dim, self.gradient_scaling)
        digest = checkpoint_digest(layout, chunking, self.mode, self.embedding_dim)
        lk.carry_digest(self, digest, HyperNetworkError)  # as generated files: made, checked
        generated = layout.generated
        scale = self.param("param_scale", lambda _: _vector([t.init_std for t in generated]))
        shift = self.param("param_shift", lambda _: _vector([t.init_mean for t in generated]))

        # The target's own init gives its state collections and excluded params (init only).
        own = delta and self.base is None  # the base is the target's own init
        target_init = functools.cache(
            lambda: _target_init(
                target, layout, self._rngs(rng_names, True), inputs, target_kwargs, own
            )
        )
        state_cols = sorted({t.collection for t in layout.state if t.collection != "params"})
        state = {
            col: self.variable(col, "target", lambda k=col: target_init()[k]) for col in state_cols
        }
        excluded = {}
        if any(t.collection == "params" for t in layout.state):
            # A variable, not self.param: param's shape check would run the init in apply too.
            excluded = self.variable("params", "target", lambda: target_init()["params"]).value
        base = None
        if delta:  # the frozen base (not a param: nothing trains it), as generated files keep it
            base = self.variable(
                "base",
                "flat",
                lambda: fk.base_flat(
                    target_init()["own"] if own else None,
                    self.base,
                    generated,
                    layout.flat_size,
                    "params",
                    HyperNetworkError,
                ),
            ).value

        dynamic = self.mode == "dynamic"
        if dynamic and condition is None:
            condition = c.first_array(inputs)
        batch = c.condition_batch(condition) if dynamic else None
        if dynamic:
            c.check_batch(inputs, batch)
        if generated_params is None or initializing:
            flat = self._generate(layout, chunking, scale, shift, condition, batch, grad_scale)
            if base is not None:  # generate="delta": the frozen base plus the generated delta
                flat = jax.lax.stop_gradient(base) + flat
        if generated_params is not None:
            c.check_flat(layout, generated_params, self.mode)
            flat = generated_params

        params = c.unflatten_params(layout, flat)
        mutable = [col for col in state_cols if self.is_mutable_collection(col)]
        rngs = self._rngs(rng_names, False)
        values = {col: v.value for col, v in state.items()}
        if dynamic:
            out, updates = lk.run_per_sample(
                target,
                params,
                values,
                mutable,
                excluded,
                rngs,
                inputs,
                target_kwargs,
                initializing=initializing,
                stats=self.batch_norm_stats,
            )
        else:
            values["params"] = lk.merge_params(params, excluded)
            out, updates = lk.apply_target(
                target.apply, values, inputs, rngs, mutable, target_kwargs, initializing
            )
        if not initializing:  # init keeps the target's own initial state
            for col in mutable:
                state[col].value = updates[col]
        return out, flat

    def _generate(
        self,
        layout: Layout,
        chunking: Chunking,
        scale: jax.Array,
        shift: jax.Array,
        condition: Any,
        batch: int | None,
        grad_scale: tuple[float, float, float] | None,
    ) -> jax.Array:
        """The decoded flat vector: ``(flat_size,)`` or ``(batch, flat_size)``; ``grad_scale``:
        the gradient multipliers, given to the default embedding and linear generator."""
        n, d, h = chunking.num_embeddings, self.embedding_dim, chunking.chunk_dim
        embedding_ctor = self.embedding_module_constructor
        if embedding_ctor is None:
            if self.mode == "dynamic":
                embedding_ctor = functools.partial(
                    DynamicEmbedding,
                    condition_dim=c.condition_dim(self.condition_shape, self.condition_dim),
                    embedding_hidden=tuple(self.embedding_hidden),
                )
            else:
                embedding_ctor = StaticEmbedding
        generator_ctor = self.weight_generator_constructor
        zero = self.generate == "delta"  # every delta starts at exactly 0
        groups = c.generator_groups(
            self.generator_groups,
            layout,
            chunking,
            d,
            self.gradient_scaling,
            generator_ctor,
            tuple(self.generator_hidden),
            self.generate,
        )
        if groups is not None:
            if self.model_axis is not None:
                raise HyperNetworkError(
                    'generator_groups="std" cannot split its heads: drop model_axis'
                )
            generator_ctor = functools.partial(
                GroupedLinearWeightGenerator, rows=groups[0], gradient_scale=groups[1]
            )
        if generator_ctor is None and self.generator_hidden:
            if self.model_axis is not None:
                raise HyperNetworkError(c.MODEL_AXIS_HIDDEN)
            generator_ctor = functools.partial(
                MLPWeightGenerator, generator_hidden=tuple(self.generator_hidden), zero_output=zero
            )
        if generator_ctor is None:
            generator_ctor = functools.partial(
                LinearWeightGenerator, model_axis=self.model_axis, zero_output=zero
            )
        elif self.model_axis is not None and not self.generator_hidden and groups is None:
            raise HyperNetworkError(c.MODEL_AXIS_CUSTOM)
        embedding_module, weight_generator = embedding_ctor(d, n), generator_ctor(d, h)
        if groups is not None and groups[1] is not None:  # per row: its group's multiplier
            rows = fk.row_factors(*groups)
            embedding_module = embedding_module.clone(
                gradient_scale=tuple(float(f) for f in rows[:, 0])
            )
        elif grad_scale is not None:  # before adoption: a clone has no parent of its own
            if isinstance(embedding_module, StaticEmbedding | DynamicEmbedding):
                embedding_module = embedding_module.clone(gradient_scale=grad_scale[0])
            if isinstance(weight_generator, LinearWeightGenerator):
                weight_generator = weight_generator.clone(gradient_scale=grad_scale[1:])
        embedding_module = self._child(embedding_module, "embedding_module", "FlaxEmbeddingModule")
        weight_generator = self._child(weight_generator, "weight_generator", "FlaxWeightGenerator")

        embedding = embedding_module(condition) if batch is not None else embedding_module()
        c.check_embedding(embedding, batch, n, d)
        expected = (n, d) if batch is None else (batch, n, d)
        raw = c.raw_vector(layout, weight_generator(embedding), batch, n, h, str(expected))
        if groups is not None:  # each tensor's raw values at unit RMS
            raw = fk.normalized(raw, layout.generated, layout.flat_size)
        return c.decode(layout, raw, scale, shift, grad_scale)

    def _child(self, module: Any, name: str, base: str) -> nn.Module:
        """Adopt a constructed submodule under a fixed name (``embedding_module``, ...)."""
        if not isinstance(module, nn.Module):
            raise HyperNetworkError(
                f"the {name.replace('_', ' ')} constructor returned {type(module).__name__}, not a "
                f"flax.linen.Module; return an instance of a {base} subclass"
            )
        return module.clone(parent=self, name=name)

    def _rngs(self, names: list[str], with_params: bool) -> dict[str, jax.Array]:
        rngs = {name: self.make_rng(name) for name in names}
        if with_params:
            rngs["params"] = self.make_rng("params")
        return rngs


# -- helpers ------------------------------------------------------------------------------------


def _measured_layout(hn: FlaxHyperNetwork, inputs: tuple, kwargs: dict, rngs: tuple) -> Layout:
    """The layout with measured init statistics (one compiled init run), cached like
    :func:`_structure`."""
    return _structure(_detached(hn.target_network), inputs, kwargs, hn.include, rngs, True)


def _detached(module: nn.Module) -> nn.Module:
    """An unbound copy of a (possibly adopted) target, to ``init``/``apply`` on its own."""
    return module.clone(parent=None)


_LAYOUTS: dict = {}


def _structure(
    target: nn.Module,
    inputs: tuple,
    kwargs: dict,
    include: Any,
    rng_names: tuple,
    measure: bool = False,
) -> Layout:
    """The target's layout for these inputs (init statistics only with ``measure``).

    Cached per target, input shapes, kwargs and include predicate when all are hashable, so
    eager ``apply`` calls do not re-trace the target's init each time.
    """

    def trace() -> Layout:
        return c.traced(
            lambda: trace_linen(
                target,
                inputs,
                include=include,
                init_kwargs=kwargs,
                measure=measure,
                rng_names=rng_names,
            )
        )

    avals, _ = _array_inputs(inputs)
    statics = tuple(x for x in inputs if not hasattr(x, "shape"))
    key = (target, avals, statics, tuple(sorted(kwargs.items())), include, rng_names, measure)
    try:
        hash(key)
    except TypeError:
        return trace()
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = trace()
    return _LAYOUTS[key]


def _target_init(
    target: nn.Module, layout: Layout, rngs: dict, inputs: tuple, kwargs: dict, own: bool = False
) -> dict:
    """The target's initial state collections and excluded params, compiled (params dropped;
    ``own``: all its params too, as ``"own"``: ``generate="delta"``'s default base)."""
    _, rebuild = _array_inputs(inputs)
    arrays = [x for x in inputs if hasattr(x, "shape") and hasattr(x, "dtype")]
    keep = {t.collection for t in layout.state}
    excluded = [(t.keys, t.shape) for t in layout.state if t.collection == "params"]

    @jax.jit
    def init(rngs: dict, arrays: list) -> dict:
        variables = nn.meta.unbox(target.init(rngs, *rebuild(arrays), **kwargs))
        out = {col: variables[col] for col in keep if col != "params"}
        if excluded:
            out["params"] = lk.excluded_params(variables["params"], excluded)
        if own:
            out["own"] = variables["params"]
        return out

    return init(rngs, arrays)


def _vector(values: list[float]) -> jax.Array:
    return jnp.asarray(values, jnp.float32)
