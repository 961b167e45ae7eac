"""Generated Flax hypernetworks learn: loss reduction on a small regression task (optax.adam).

For Linen and NNX, static and dynamic, the generated seed-sized MLP hypernetwork (8 -> 64 -> 64
-> 4) fits a random linear teacher on 256 samples. The factor is stated here, the seed fixed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from gen_support import TARGETS_DIR, import_file

from hypernn_gen.cli import main

STEPS = 60
FACTOR = 5.0  # the final MSE must be at least this many times smaller than the initial one


def teacher_data() -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (256, 8))
    w = jax.random.normal(kw, (8, 4)) / jnp.sqrt(8.0)
    return x, x @ w


def generate(tmp_path: Path, target: str, mode: str):  # noqa: ANN201
    out = tmp_path / f"{target}_{mode}.py"
    args = [str(TARGETS_DIR / f"{target}.py"), "--backend", "flax", "--mode", mode]
    assert main([*args, "-o", str(out)]) == 0
    module = import_file(out)
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return cls


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_linen_hypernetwork_learns(tmp_path: Path, mode: str) -> None:
    hn = generate(tmp_path, "linen_mlp", mode)()
    x, y = teacher_data()
    params = hn.init(jax.random.key(1), x)["params"]

    def loss_fn(p: dict) -> jax.Array:
        out, _ = hn.apply({"params": p}, x)
        return jnp.mean((out - y) ** 2)

    tx = optax.adam(1e-2)
    state = tx.init(params)

    @jax.jit
    def step(p: dict, s: optax.OptState) -> tuple[dict, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(STEPS):
        params, state, _ = step(params, state)
    last = float(loss_fn(params))
    print(f"linen {mode}: MSE {first:.4f} -> {last:.5f} ({first / last:.0f}x)")
    assert last * FACTOR < first


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_nnx_hypernetwork_learns(tmp_path: Path, mode: str) -> None:
    hn = generate(tmp_path, "nnx_mlp", mode)(rngs=nnx.Rngs(1))
    x, y = teacher_data()
    optimizer = nnx.Optimizer(hn, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(model: nnx.Module) -> jax.Array:
        out, _ = model(x)
        return jnp.mean((out - y) ** 2)

    @nnx.jit
    def step(model: nnx.Module, opt: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    first = float(loss_fn(hn))
    for _ in range(STEPS):
        step(hn, optimizer)
    last = float(loss_fn(hn))
    print(f"nnx {mode}: MSE {first:.4f} -> {last:.5f} ({first / last:.0f}x)")
    assert last * FACTOR < first
