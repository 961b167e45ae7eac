"""LoRA hypernetworks for Flax NNX targets: the generator and the hypernetwork module.

The hypernetwork holds a copy of the target whose parameters are :class:`FrozenBase` variables,
not ``nnx.Param``: ``nnx.Optimizer(hypernetwork, tx, wrt=nnx.Param)`` and ``nnx.grad`` see the
generator only. The adapted ``nnx.Linear``/``nnx.LinearGeneral`` layers become
:class:`LoRALinear`/:class:`LoRALinearGeneral` (same variables), which add their adapter term
while the hypernetwork runs them. See :mod:`hypernn_gen.kernel.lora_flax` for the math.
"""

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .flax import (
    base_leaf,
    read_checkpoint,
)
from .lora_flax import (
    Adapter,
    a_head_std,
    check_kernel,
    condition_features,
    head_groups,
    layer_embeddings,
    lora_output,
    merge_adapters,
    out_features,
    split_adapters,
)

__all__ = [
    "LORA",
    "Adapter",
    "FrozenBase",
    "LoRALinear",
    "LoRALinearGeneral",
    "NNXLoRAGenerator",
    "NNXLoRAHyperModule",
    "frozen_copy",
    "install_lora",
]


class FrozenBase(nnx.Variable):
    """A weight of the frozen base model: not an ``nnx.Param``, so nothing trains it."""


# While the hypernetwork runs its target: (module, input, output) -> output with the adapter.
LORA: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("lora", default=None)


class LoRALinear(nnx.Linear):
    """``nnx.Linear`` that adds its generated adapter term while the hypernetwork runs it."""

    lora_index: int  # its entry in the adapters

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        y = super().__call__(inputs, *args, **kwargs)
        call = LORA.get()
        return y if call is None else call(self, inputs, y)


class LoRALinearGeneral(nnx.LinearGeneral):
    """``nnx.LinearGeneral`` that adds its generated adapter term while the hypernetwork runs it."""

    lora_index: int  # its entry in the adapters

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        y = super().__call__(inputs, *args, **kwargs)
        call = LORA.get()
        return y if call is None else call(self, inputs, y)


def frozen_copy(
    target_network: nnx.Module, base: Any = None, error: type[Exception] = ValueError
) -> nnx.Module:
    """A copy of the target whose ``nnx.Param`` variables are :class:`FrozenBase`, with values
    from ``base`` (a checkpoint path or ``nnx.state(model).to_pure_dict()``) when given; its other
    variables are copied, or taken from ``base`` where it has them."""
    tree = None if base is None else read_checkpoint(base) if isinstance(base, str) else base
    graphdef, state = nnx.split(target_network)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        name = ".".join(map(str, path))
        if isinstance(var, nnx.Param):
            if tree is not None:
                value = base_leaf(tree, tuple(path), value.shape, name, error)
            flat.append((path, FrozenBase(value)))
        else:
            found = None if tree is None else base_leaf_or_none(tree, tuple(path), value)
            flat.append((path, var.copy() if found is None else var.replace(found)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def base_leaf_or_none(tree: Any, keys: tuple, value: Any) -> Any:
    """A non-parameter variable's value from the base checkpoint, if it has one of that shape."""
    try:
        return base_leaf(tree, keys, jnp.shape(value), ".".join(map(str, keys)))
    except ValueError:
        return None


def install_lora(target: nnx.Module, adapters: Any, error: type[Exception] = ValueError) -> None:
    """Check the adapted layers and turn them into :class:`LoRALinear`/:class:`LoRALinearGeneral`."""
    modules = dict(nnx.iter_modules(target))
    for i, a in enumerate(adapters):
        module = modules.get(tuple(a.keys))
        if type(module) not in (nnx.Linear, nnx.LinearGeneral, LoRALinear, LoRALinearGeneral):
            raise error(
                f"this target's layer {a.path!r} is not the nnx.Linear the adapters were made "
                "for; regenerate the file for the new target"
            )
        check_kernel(a, module.kernel.get_value().shape, error)
        plain = isinstance(module, nnx.Linear)
        module.__class__ = LoRALinear if plain else LoRALinearGeneral
        module.lora_index = i


@contextlib.contextmanager
def adapted(
    adapters: Any,
    lora: dict,
    scaling: float,
    dropout: Callable | None,
    error: type[Exception] = ValueError,
) -> Iterator[None]:
    """While active, the adapted layers add ``scaling * B (A dropout(x))`` to their output."""

    def call(module: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        a = adapters[module.lora_index]
        h = x if dropout is None else dropout(x)
        return lora_output(
            y, h, lora[f"{a.path}.lora_A"], lora[f"{a.path}.lora_B"], scaling, a.in_dims, error
        )

    token = LORA.set(call)
    try:
        yield
    finally:
        LORA.reset(token)


class NNXLoRAGenerator(nnx.Module):
    """Makes every adapter's ``A`` and ``B`` from a condition: ``()`` (static) or
    ``(condition)`` (dynamic, ``(batch, *condition_shape)``) -> ``{path.lora_A: A, path.lora_B:
    B}``, with a leading batch dimension in dynamic mode."""

    def __init__(
        self,
        adapters: Any,
        rank: int,
        embedding_dim: int,
        condition_shape: tuple | None = None,
        embedding_hidden: tuple = (64,),
        generator_hidden: tuple = (),
        shared: bool = True,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.adapters, self.rank, self.shared = tuple(adapters), rank, shared
        self.condition_shape = None if condition_shape is None else tuple(condition_shape)
        normal = jax.nn.initializers.normal
        if condition_shape is None:
            self.condition = nnx.Param(normal(1.0)(rngs.params(), (embedding_dim,)))
        else:
            layers, width = [], math.prod(condition_shape)
            for hidden in (*embedding_hidden, embedding_dim):
                layers.append(nnx.Linear(width, hidden, rngs=rngs))
                width = hidden
            self.condition_net = nnx.List(layers)
        if shared:
            depths = 1 + max(a.depth for a in self.adapters)
            kinds = 1 + max(a.kind for a in self.adapters)
            self.depth = nnx.Param(normal(1.0)(rngs.params(), (depths, embedding_dim)))
            self.kind = nnx.Param(normal(1.0)(rngs.params(), (kinds, embedding_dim)))
        trunk, width = [], embedding_dim
        for hidden in generator_hidden:  # He-normal, zero bias
            init = normal(math.sqrt(2.0 / width))
            trunk.append(nnx.Linear(width, hidden, kernel_init=init, rngs=rngs))
            width = hidden
        self.trunk = nnx.List(trunk)
        self.groups = head_groups(self.adapters, shared)
        heads_a, heads_b = [], []
        for members in self.groups:
            first = self.adapters[members[0]]
            init_a = normal(a_head_std(first.in_features, width))
            heads_a.append(
                nnx.Linear(width, rank * first.in_features, kernel_init=init_a, rngs=rngs)
            )
            zero = jax.nn.initializers.zeros  # B = 0: the output starts at the base
            heads_b.append(
                nnx.Linear(width, out_features(first) * rank, kernel_init=zero, rngs=rngs)
            )
        self.heads_a, self.heads_b = nnx.List(heads_a), nnx.List(heads_b)

    def __call__(self, condition: Any = None) -> dict[str, jax.Array]:
        if self.condition_shape is None:
            c = self.condition.get_value()
        else:
            c = condition_features(condition, self.condition_shape)
            for i, layer in enumerate(self.condition_net):
                c = layer(c) if i == len(self.condition_net) - 1 else jax.nn.relu(layer(c))
        depth = self.depth.get_value() if self.shared else None
        kind = self.kind.get_value() if self.shared else None
        h = layer_embeddings(c, depth, kind, self.adapters)
        for layer in self.trunk:
            h = jax.nn.relu(layer(h))
        heads = []
        for members, head_a, head_b in zip(self.groups, self.heads_a, self.heads_b, strict=True):
            hm = h[..., jnp.asarray(members), :]  # one product per group for all its layers
            heads.append((head_a(hm), head_b(hm)))
        return split_adapters(self.adapters, self.groups, heads, self.rank)


class NNXLoRAHyperModule(nnx.Module):
    """A frozen copy of ``target_network`` with generated LoRA adapters on ``adapters``.

    ``__call__(*inputs, condition=None, adapters=None, **kwargs)`` returns ``(output, adapters)``,
    ``adapters`` the generated ``{path.lora_A: A, path.lora_B: B}`` (dynamic: one per sample; the
    condition defaults to the first input). ``base``: a checkpoint path or pure dict of the base
    variables (default: the target's own). Dropout on the adapters' input runs in ``train()``
    mode (the default) with ``rngs``' ``dropout`` stream, not in ``eval()`` mode.
    """

    error = ValueError  # the exception class its checks raise

    def __init__(
        self,
        target_network: nnx.Module,
        adapters: Any,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        embedding_dim: int,
        condition_shape: tuple | None = None,
        embedding_hidden: tuple = (64,),
        generator_hidden: tuple = (),
        shared: bool = True,
        base: Any = None,
        rngs: nnx.Rngs,
    ) -> None:
        self.adapters, self.rank, self.alpha = tuple(adapters), rank, alpha
        self.scaling, self.dynamic = alpha / rank, condition_shape is not None
        self.target = frozen_copy(target_network, base, self.error)
        install_lora(self.target, self.adapters, self.error)
        self.generator = NNXLoRAGenerator(
            adapters,
            rank,
            embedding_dim,
            condition_shape,
            embedding_hidden,
            generator_hidden,
            shared,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def generate_adapters(self, condition: Any = None) -> dict[str, jax.Array]:
        """``{path.lora_A: A, path.lora_B: B}`` for one condition set (static: the only one)."""
        if not self.dynamic:
            return self.generator()
        shape = self.generator.condition_shape
        return self.generator(condition_features(condition, shape, self.error))

    def merged_params(self, condition: Any = None) -> dict:
        """The target's parameters (``nnx.to_pure_dict`` of its ``nnx.Param`` state) with the
        adapters of one condition (dynamic: a batch of 1) merged into the adapted kernels."""
        lora = self.generate_adapters(condition)
        if self.dynamic:
            if jax.tree.leaves(lora)[0].shape[0] != 1:
                raise self.error("merged_params takes the condition of one sample (a batch of 1)")
            lora = {k: v[0] for k, v in lora.items()}
        params = nnx.to_pure_dict(nnx.state(self.target, FrozenBase))
        return merge_adapters(params, self.adapters, lora, self.scaling)

    def __call__(
        self,
        *inputs: Any,
        condition: Any = None,
        adapters: dict[str, jax.Array] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, jax.Array]]:
        """Run the frozen target with the adapters; returns ``(output, adapters)``."""
        if adapters is None:
            if self.dynamic and condition is None and inputs:
                condition = inputs[0]
            adapters = self.generate_adapters(condition)
        with adapted(self.adapters, adapters, self.scaling, self.dropout, self.error):
            return self.target(*inputs, **kwargs), adapters
