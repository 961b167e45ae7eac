"""Worker for tests/test_sharding_jax.py: a data-parallel jitted train step on 4 host devices.

    python tests/sharding_jax_worker.py

XLA must see the 4 CPU devices before jax is imported, so this runs in its own process: it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` first. For the runtime Linen hypernetwork
(``FlaxHyperNetwork``, static and dynamic) on a small MLP it trains ``STEPS`` SGD steps with one
jitted step function twice: once on plain arrays, once with the batch sharded over a
``Mesh(("data",))`` of the 4 devices (``NamedSharding(mesh, P("data"))``) and the parameters
replicated (``P()``). It prints one JSON line per mode: the largest difference between the two
runs' parameters, the least any parameter moved, how many devices hold the batch, whether the trained
parameters are replicated and the number of all-reduces in the compiled sharded step.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402 - after XLA_FLAGS
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hypernn_gen.runtime.flax import FlaxHyperNetwork  # noqa: E402

STEPS = 5
LR = 1e-2
BATCH = 16


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))


def run(mode: str) -> dict[str, object]:
    hypernetwork = FlaxHyperNetwork(MLP(), mode=mode)
    kx, ky, kinit = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, 8))
    y = jax.random.normal(ky, (BATCH, 4))
    variables = hypernetwork.init(kinit, x)
    optimizer = optax.sgd(LR)

    def loss_fn(params, x, y):  # noqa: ANN001, ANN202
        output, _ = hypernetwork.apply({**variables, "params": params}, x)
        return jnp.mean((output - y) ** 2)

    @jax.jit
    def step(params, opt_state, x, y):  # noqa: ANN001, ANN202
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def train(params, x, y):  # noqa: ANN001, ANN202
        opt_state = optimizer.init(params)
        for _ in range(STEPS):
            params, opt_state, _ = step(params, opt_state, x, y)
        return params

    single = train(variables["params"], x, y)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    params = jax.device_put(variables["params"], replicated)
    sharded = train(params, xs, ys)
    compiled = step.lower(params, optimizer.init(params), xs, ys).compile().as_text()

    def distances(a, b) -> list[float]:  # noqa: ANN001 - same tree structure or an error
        tree = jax.tree_util.tree_map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
        return jax.tree_util.tree_leaves(tree)

    diff = max(distances(single, sharded))
    moved = min(distances(single, variables["params"]))
    return {
        "mode": mode,
        "devices": len(jax.devices()),
        "batch_devices": len(xs.sharding.device_set),
        "params_replicated": all(
            p.sharding.is_fully_replicated for p in jax.tree_util.tree_leaves(sharded)
        ),
        "max_diff": diff,
        "min_moved": moved,
        "all_reduces": compiled.count("all-reduce("),
    }


if __name__ == "__main__":
    for mode in ("static", "dynamic"):
        print(json.dumps(run(mode)))
