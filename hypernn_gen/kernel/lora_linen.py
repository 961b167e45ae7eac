"""LoRA hypernetworks for Flax Linen targets: the generator and the hypernetwork module.

The frozen target's variables live in the hypernetwork's ``base`` collection (``variables["base"]
["target"]``), not in ``params``: an optimizer given ``variables["params"]`` trains the generator
only. The adapted layers add their adapter term through ``nn.intercept_methods``; the target's
code and variables are unchanged. See :mod:`hypernn_gen.kernel.lora_flax` for the math.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    lora_dropout,
    lora_output,
    merge_adapters,
    out_features,
    split_adapters,
)

__all__ = [
    "Adapter",
    "LinenLoRAGenerator",
    "LinenLoRAHyperNetwork",
    "base_variables",
    "check_layers",
    "lora_apply",
    "merge_adapters",
]


class LinenLoRAGenerator(nn.Module):
    """Makes every adapter's ``A`` and ``B`` from a condition: ``()`` (static) or
    ``(condition)`` (dynamic, ``(batch, *condition_shape)``) -> ``{path.lora_A: A, path.lora_B:
    B}``, with a leading batch dimension in dynamic mode."""

    adapters: tuple
    rank: int
    embedding_dim: int
    condition_shape: tuple | None = None
    embedding_hidden: tuple = (64,)
    generator_hidden: tuple = ()
    shared: bool = True

    @nn.compact
    def __call__(self, condition: Any = None) -> dict[str, jax.Array]:
        dim, normal = self.embedding_dim, nn.initializers.normal
        if self.condition_shape is None:
            c = self.param("condition", normal(1.0), (dim,))
        else:
            c = condition_features(condition, self.condition_shape)
            for i, hidden in enumerate(self.embedding_hidden):
                c = nn.relu(nn.Dense(hidden, name=f"condition_{i}")(c))
            c = nn.Dense(dim, name=f"condition_{len(self.embedding_hidden)}")(c)
        depth = kind = None
        if self.shared:
            depths = 1 + max(a.depth for a in self.adapters)
            depth = self.param("depth", normal(1.0), (depths, dim))
            kind = self.param("kind", normal(1.0), (1 + max(a.kind for a in self.adapters), dim))
        h = layer_embeddings(c, depth, kind, self.adapters)
        width = dim
        for i, hidden in enumerate(self.generator_hidden):  # He-normal, zero bias
            init = normal(math.sqrt(2.0 / width))
            h = nn.relu(nn.Dense(hidden, kernel_init=init, name=f"trunk_{i}")(h))
            width = hidden
        groups = head_groups(self.adapters, self.shared)
        heads = []
        for g, members in enumerate(groups):
            first = self.adapters[members[0]]
            hm = h[..., jnp.asarray(members), :]  # one product per group for all its layers
            init_a = normal(a_head_std(first.in_features, width))
            a_all = nn.Dense(self.rank * first.in_features, kernel_init=init_a, name=f"head_a_{g}")
            size_b = out_features(first) * self.rank  # B = 0: the output starts at the base
            b_all = nn.Dense(size_b, kernel_init=nn.initializers.zeros_init(), name=f"head_b_{g}")
            heads.append((a_all(hm), b_all(hm)))
        return split_adapters(self.adapters, groups, heads, self.rank)


def base_variables(
    target: nn.Module, base: Any, init: Callable[[], dict], error: type[Exception] = ValueError
) -> dict:
    """The frozen base's variables: ``init()`` (the target's own initialisation) when ``base`` is
    None, else ``base`` (a checkpoint path, or the variables or their ``params``) checked leaf by
    leaf against the target's."""
    variables = init()
    if base is None:
        return variables
    tree = read_checkpoint(base) if isinstance(base, str) else base
    tree = dict(tree)
    if "params" not in tree:
        tree = {"params": tree}
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    leaves = []
    for path, leaf in flat:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if keys[0] == "params" or keys[0] in tree:
            leaves.append(base_leaf(tree, keys, leaf.shape, ".".join(map(str, keys[1:])), error))
        else:
            leaves.append(leaf)
    return jax.tree.unflatten(jax.tree.structure(variables), leaves)


def lora_apply(
    apply: Callable,
    adapters: Any,
    lora: dict,
    scaling: float,
    rate: float,
    key: Any,
    error: type[Exception] = ValueError,
) -> Callable:
    """``apply`` (a target's ``apply``) with ``scaling * B (A x)`` added to each adapted layer's
    output (``nn.intercept_methods``); ``key``: the adapters' dropout key, or None."""
    found = {a.keys: (j, a) for j, a in enumerate(adapters)}

    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or module.path not in found:
            return y
        j, a = found[module.path]
        x = lora_dropout(args[0], rate, None if key is None else jax.random.fold_in(key, j))
        return lora_output(
            y, x, lora[f"{a.path}.lora_A"], lora[f"{a.path}.lora_B"], scaling, a.in_dims, error
        )

    def run(*args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(intercept):
            return apply(*args, **kwargs)

    return run


class LinenLoRAHyperNetwork(nn.Module):
    """A frozen ``target_network`` with generated LoRA adapters on ``adapters``.

    ``__call__(*inputs, condition=None, adapters=None, **kwargs)`` returns ``(output, adapters)``,
    ``adapters`` the generated ``{path.lora_A: A, path.lora_B: B}`` (dynamic, when
    ``condition_shape`` is set: one per sample; the condition defaults to the first input).
    ``init`` puts the generator in ``params`` and the frozen base in ``base``: the target's own
    initialisation (the ``params`` rng), or ``base`` (a checkpoint path or variables). The
    adapters are scaled by ``lora_alpha / lora_rank`` (alpha default: the rank). An rng named
    ``lora_dropout`` turns the adapters' dropout on; other rngs (``dropout``) and keyword
    arguments reach the target.
    """

    target_network: nn.Module
    adapters: tuple = ()
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    embedding_dim: int = 32
    condition_shape: tuple | None = None
    embedding_hidden: tuple = (64,)
    generator_hidden: tuple = ()
    lora_generator: str = "shared"
    base: Any = None
    error = ValueError  # the exception class its checks raise

    def adapted_layers(self, inputs: tuple, kwargs: dict) -> tuple:
        """The adapted layers (a subclass may find them from the inputs)."""
        return self.adapters

    @nn.compact
    def __call__(
        self,
        *inputs: Any,
        condition: Any = None,
        adapters: dict[str, jax.Array] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, jax.Array]]:
        target = self.target_network.clone(parent=None)  # unbound: run with init/apply
        rng_names = [n for n in self.scope.rngs if n not in ("params", "lora_dropout")]
        layers = self.adapted_layers(inputs, kwargs)

        def init() -> dict:
            rngs = {name: self.make_rng(name) for name in ("params", *rng_names)}
            return nn.meta.unbox(target.init(rngs, *inputs, **kwargs))

        base = self.variable("base", "target", base_variables, target, self.base, init, self.error)
        if self.is_initializing():
            check_layers(base.value.get("params", {}), layers, self.error)
        generator = LinenLoRAGenerator(
            layers,
            self.lora_rank,
            self.embedding_dim,
            self.condition_shape,
            self.embedding_hidden,
            self.generator_hidden,
            self.lora_generator == "shared",
            name="generator",
        )
        dynamic = self.condition_shape is not None
        if adapters is None or self.is_initializing():
            if dynamic and condition is None and inputs:
                condition = inputs[0]
            if dynamic:
                condition = condition_features(condition, self.condition_shape, self.error)
            made = generator(condition if dynamic else None)
            adapters = made if adapters is None else adapters
        key = self.make_rng("lora_dropout") if self.has_rng("lora_dropout") else None
        scaling = (self.lora_alpha or self.lora_rank) / self.lora_rank
        apply = lora_apply(
            target.apply, layers, adapters, scaling, self.lora_dropout, key, self.error
        )
        variables = jax.lax.stop_gradient(base.value)  # the base is frozen
        rngs = {name: self.make_rng(name) for name in rng_names}
        return apply(variables, *inputs, rngs=rngs, **kwargs), adapters


def check_layers(params: dict, adapters: Any, error: type[Exception] = ValueError) -> None:
    """Refuse a target without the adapted layers' kernels, or with other shapes."""
    for a in adapters:
        node: Any = params
        for key in a.keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        kernel = node.get("kernel") if isinstance(node, dict) else None
        if kernel is None:
            raise error(
                f"this target has no layer {a.path!r} with a kernel; regenerate the file for "
                "the new target"
            )
        check_kernel(a, kernel.shape, error)
