"""Flax hypernetworks of a tiny GPT train with the target's optimizer and learning rate (issue 16).

The char-level language model of tests/test_training_sgd.py (the same text, windows, batches
and 300 steps of 32 windows), on the Linen and NNX tiny GPTs of generated_examples/targets
(tied embedding, causal attention, LayerNorm; 15,328 parameters): the plain target and its
hypernetworks (the committed generated files and the runtime's twins; static, and one dynamic
case) are trained with optax's SGD 0.5 and Adam 3e-3, the rates that suit the plain target. A
hypernetwork must stay finite and end within 1.5x of the plain target's final loss. Each run is
one compiled scan over the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
import torch
from flax import nnx
from gen_support import REPO, import_file
from test_training_sgd import BATCH, RATIO, STEPS, char_lm_data

from hypernn_gen.runtime.flax import FlaxHyperNetwork, NNXHyperNetwork

OPTIMIZERS: dict[str, Callable] = {
    "sgd-0.5": lambda: optax.sgd(0.5),
    "adam-3e-3": lambda: optax.adam(3e-3),
}


def lm_data() -> tuple[jax.Array, jax.Array, jax.Array]:
    """The windows, their next characters, and the batches' indices ``(STEPS, BATCH)`` (those
    of tests/test_training_sgd.py's ``train``)."""
    x, y = char_lm_data()
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randint(0, x.shape[0], (BATCH,), generator=g) for _ in range(STEPS)])
    return jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), jnp.asarray(idx.numpy())


def xent(out: Any, y: jax.Array) -> jax.Array:
    logits = out[0] if isinstance(out, tuple) else out
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def lm_train(loss_fn: Callable, params: Any, optimizer: str) -> float:
    """``STEPS`` steps of ``optimizer`` on ``loss_fn(params, x, y)``; the final loss on all data."""
    x, y, idx = lm_data()
    tx = OPTIMIZERS[optimizer]()

    @jax.jit
    def run(params: Any) -> jax.Array:
        def step(carry: tuple, batch: jax.Array) -> tuple:
            p, state = carry
            grads = jax.grad(loss_fn)(p, x[batch], y[batch])
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), idx)
        return loss_fn(params, x, y)

    return float(run(params))


def lm_file(framework: str, mode: str) -> tuple[Any, type]:
    path = REPO / "generated_examples" / f"{framework}_transformer_{framework}_{mode}.py"
    module = import_file(path)
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return module, cls


def linen_lm(kind: str, mode: str) -> tuple[Callable, Any]:
    """``(loss_fn, params)`` of the plain Linen GPT (``"plain"``) or a hypernetwork of it."""
    module, cls = lm_file("linen", mode)
    if kind == "plain":
        model = module.make_target()
    elif kind == "generated":
        model = cls()
    else:
        model = FlaxHyperNetwork(module.make_target(), mode=mode)
    x0 = jnp.zeros((BATCH, module.CONTEXT), jnp.int32)
    variables = model.init(jax.random.key(1), x0)
    params = variables.pop("params")

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return xent(model.apply({"params": p, **variables}, x), y)

    return loss_fn, params


def nnx_lm(kind: str, mode: str) -> tuple[Callable, Any]:
    """``(loss_fn, params)`` of the plain NNX GPT (``"plain"``) or a hypernetwork of it."""
    module, cls = lm_file("nnx", mode)
    target = module.TinyGPT(rngs=nnx.Rngs(1))
    if kind == "plain":
        model = target
    elif kind == "generated":
        model = cls(target, rngs=nnx.Rngs(1))
    else:
        dim = module.CONTEXT if mode == "dynamic" else None
        model = NNXHyperNetwork(target, mode=mode, condition_dim=dim, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return xent(nnx.merge(graphdef, p, rest)(x), y)

    return loss_fn, params


BUILDERS = {"linen": linen_lm, "nnx": nnx_lm}


def check_trains(framework: str, mode: str, optimizer: str, kinds: tuple[str, ...]) -> None:
    build = BUILDERS[framework]
    plain = lm_train(*build("plain", mode), optimizer)
    for kind in kinds:
        final = lm_train(*build(kind, mode), optimizer)
        print(f"{framework} {mode} {optimizer} {kind}: {final:.4f} vs plain {plain:.4f}")
        assert math.isfinite(final), f"{framework} {kind} {mode} {optimizer} diverged"
        assert final <= RATIO * plain, f"{framework} {kind} {mode} {optimizer}: {final} vs {plain}"


STATIC_GAP = (
    "issue 16, not met yet on Flax: the default static hypernetwork (one generator shared by "
    "every tensor) ends at {}. The Flax GPT's init stds are closer than Torch's (0.09-0.18 for "
    "the kernels and the embedding, 0.02 for pos_emb, 0 for biases and LayerNorm), the per-tensor "
    "steps were not measured here; the Torch cause (one shared generator moves tensor t at "
    "s_t^2 / s2 times the target's step, docs/concepts.md 'Known gaps') is the likely one: the "
    "grouped design (a head and a table per group of tensors of similar init std, unit-RMS "
    "decode) ends at 1.06-1.25x under optax (benchmarks/probe_char_lm_flax.py); not in the Flax "
    "kernel yet"
)
MEASURED = {
    ("linen", "sgd-0.5"): "2.06x the target's loss (0.544 vs 0.264; runtime the same)",
    ("linen", "adam-3e-3"): "1.59x the target's loss (0.404 vs 0.254; runtime the same)",
    ("nnx", "sgd-0.5"): "2.20x the target's loss (0.566 vs 0.257; runtime 0.621, 2.42x)",
    ("nnx", "adam-3e-3"): "2.18x the target's loss (0.508 vs 0.233; runtime 0.504, 2.16x)",
}
DYNAMIC_GAP = (
    "issue 16, not met yet on Flax: the generated dynamic hypernetwork (the condition: the "
    "window's token ids) ends at 5.63x the target's loss under Adam 3e-3 (1.310 vs 0.233; "
    "Linen 0.725 vs 0.254, 2.85x) and diverges (NaN at step 2) under SGD 0.5 in Linen and NNX. "
    "The ids (0-63) are the modulation's unnormalised input: the first loss is 9.19 (the "
    "target's: 4.16); with condition=ids/63 it is 4.86, Adam ends at 1.80x and SGD 0.5 still "
    "diverges (NaN at step 6, through the modulation network, which keeps raw gradients)"
)


@pytest.mark.parametrize(
    ("framework", "optimizer"),
    [
        pytest.param(
            framework,
            optimizer,
            marks=pytest.mark.xfail(strict=True, reason=STATIC_GAP.format(measured)),
            id=f"{framework}-{optimizer}",
        )
        for (framework, optimizer), measured in MEASURED.items()
    ],
)
def test_flax_char_lm_static_trains_like_the_target(framework: str, optimizer: str) -> None:
    check_trains(framework, "static", optimizer, ("generated", "runtime"))


@pytest.mark.xfail(strict=True, reason=DYNAMIC_GAP)
def test_flax_char_lm_dynamic_trains_like_the_target() -> None:
    check_trains("nnx", "dynamic", "adam-3e-3", ("generated",))


def nnx_grouped(mode: str) -> tuple[Callable, Any]:
    """The NNX runtime hypernetwork with ``generator_groups="std"`` (hypernn_gen.design)."""
    module, _ = lm_file("nnx", mode)
    dim = module.CONTEXT if mode == "dynamic" else None
    model = NNXHyperNetwork(
        module.TinyGPT(rngs=nnx.Rngs(1)),
        mode=mode,
        condition_dim=dim,
        generator_groups="std",
        rngs=nnx.Rngs(1),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return lambda p, x, y: xent(nnx.merge(graphdef, p, rest)(x), y), params


@pytest.mark.parametrize(
    ("mode", "optimizer"),
    [("static", "sgd-0.5"), ("static", "adam-3e-3"), ("dynamic", "adam-3e-3")],
)
def test_flax_char_lm_grouped_generator_trains_like_the_target(mode: str, optimizer: str) -> None:
    """generator_groups="std" (measured: static SGD 1.28x, Adam 1.14x; dynamic Adam 1.05x;
    dynamic SGD 0.5 ends at 1.93x, not asserted)."""
    plain = lm_train(*nnx_lm("plain", mode), optimizer)
    final = lm_train(*nnx_grouped(mode), optimizer)
    print(f"nnx grouped {mode} {optimizer}: {final:.4f} vs plain {plain:.4f}")
    assert math.isfinite(final) and final <= RATIO * plain, (final, plain)
