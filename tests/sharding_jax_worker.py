"""Worker for tests/test_sharding_jax.py: sharded jitted train steps on 4 host devices.

    python tests/sharding_jax_worker.py [GENERATED_FILE ...]

XLA must see the 4 CPU devices before jax is imported, so this runs in its own process: it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (and fast, unoptimised CPU code) first. For each hypernetwork (the runtime
``FlaxHyperNetwork``/``NNXHyperNetwork`` on small MLPs, and every generated Linen/NNX file named
on the command line, static and dynamic) it trains ``STEPS`` SGD steps of one jitted step
function on plain arrays (the reference, ``model_axis=None``) and then

* ``batch``: the same on a ``Mesh(("data",))`` of the 4 devices, the batch sharded
  (``NamedSharding(mesh, P("data"))``), the parameters replicated (``P()``);
* ``batch+model``: on a 2x2 ``Mesh(("data", "model"))`` entered with ``jax.set_mesh``, the
  batch on ``"data"`` and the hypernetwork built with ``model_axis="model"``, so the weight
  generator's kernel/bias are split over ``"model"`` (Linen: ``jax.jit(init,
  out_shardings=nn.get_sharding(...))``; NNX: created split by eager sharding).

It prints one JSON line per run: the largest difference to the reference's trained parameters
(and, for ``batch+model``, its initial ones), the least any parameter moved, how many devices
hold the batch, whether the parameters are replicated, the all-reduces/all-gathers of the compiled
step and the generator kernel's partition spec and shard shapes at creation and after training.
Then one line per expected error (``model_axis`` misuse) with its type and message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# 4 CPU devices; and the cheapest CPU code generation (both runs of every comparison use it):
# compiling 40 small train steps takes a third less time.
FLAGS = (
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402 - after XLA_FLAGS
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hypernn_gen.runtime.flax import (  # noqa: E402
    FlaxHyperNetwork,
    LinearWeightGenerator,
    NNXHyperNetwork,
)

STEPS = 5
LR = 1e-2  # the runtime hypernetworks of the small MLPs below
LR_GENERATED = 3e-3  # the generated files' 64-wide MLPs: SGD at 1e-2 diverges there
BATCH = 16
CHUNK_DIM = 24  # the runtime hypernetworks' chunk size: even, so "model" (2 devices) splits it


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))


class NNXMLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def data() -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (BATCH, 8)), jax.random.normal(ky, (BATCH, 4))


def train(loss_fn: Callable, lr: float, params: Any, x: jax.Array, y: jax.Array) -> tuple:
    """``STEPS`` SGD steps of one jitted step, compiled once for these arguments' shardings;
    returns the trained parameters and the compiled step's HLO text."""
    optimizer = optax.sgd(lr)

    def step(params, opt_state, x, y):  # noqa: ANN001, ANN202
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
    for _ in range(STEPS):
        params, opt_state = compiled(params, opt_state, x, y)
    return params, compiled.as_text()


def distance(a: Any, b: Any) -> float:
    """The largest absolute difference between two trees of the same structure."""
    diffs = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
    return max(jax.tree.leaves(diffs))


def least_moved(a: Any, b: Any) -> float:
    diffs = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
    return min(jax.tree.leaves(diffs))


def describe(kernel: jax.Array) -> dict[str, Any]:
    return {
        "spec": list(kernel.sharding.spec),
        "shards": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
        "devices": len(kernel.sharding.device_set),
    }


def meshes() -> tuple[Mesh, Mesh]:
    devices = np.array(jax.devices())
    return Mesh(devices, ("data",)), Mesh(devices.reshape(2, 2), ("data", "model"))


def collectives(hlo: str) -> dict[str, int]:
    return {"all_reduces": hlo.count("all-reduce("), "all_gathers": hlo.count("all-gather(")}


# -- Linen ----------------------------------------------------------------------------------------


def run_linen(
    name: str, make: Callable[[str | None], nn.Module], lr: float
) -> list[dict[str, Any]]:
    """``make(model_axis)`` builds the (unbound) hypernetwork."""
    x, y = data()
    key = jax.random.key(1)

    def loss_of(hn: nn.Module) -> Callable:
        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            output, _ = hn.apply({"params": params}, x)
            return jnp.mean((output - y) ** 2)

        return loss_fn

    hn = make(None)
    start = jax.jit(hn.init)(key, x)["params"]
    reference, _ = train(loss_of(hn), lr, start, x, y)
    rows = []

    data_mesh, model_mesh = meshes()
    batch, replicated = NamedSharding(data_mesh, P("data")), NamedSharding(data_mesh, P())
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    params = jax.device_put(start, replicated)
    trained, hlo = train(loss_of(hn), lr, params, xs, ys)
    rows.append(
        {
            "name": name,
            "run": "batch",
            "batch_devices": len(xs.sharding.device_set),
            "params_replicated": all(
                p.sharding.is_fully_replicated for p in jax.tree.leaves(trained)
            ),
            "max_diff": distance(trained, reference),
            "min_moved": least_moved(reference, start),
            **collectives(hlo),
        }
    )

    hn = make("model")
    with jax.set_mesh(model_mesh):
        abstract = jax.eval_shape(hn.init, key, x)
        shardings = nn.get_sharding(abstract, model_mesh)
        params = jax.jit(hn.init, out_shardings=shardings)(key, x)["params"]
        batch = NamedSharding(model_mesh, P("data"))
        xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
        trained, hlo = train(loss_of(hn), lr, params, xs, ys)
    kernel = params["weight_generator"]["linear"]["kernel"]
    rows.append(
        {
            "name": name,
            "run": "batch+model",
            "boxed": isinstance(kernel, nn.Partitioned),
            "batch_devices": len(xs.sharding.device_set),
            "init_diff": distance(nn.meta.unbox(params), start),
            "max_diff": distance(nn.meta.unbox(trained), reference),
            "min_moved": least_moved(reference, start),
            "kernel_shape": list(kernel.value.shape),
            "kernel": describe(kernel.value),
            "trained_kernel": describe(trained["weight_generator"]["linear"]["kernel"].value),
            **collectives(hlo),
        }
    )
    return rows


# -- NNX ------------------------------------------------------------------------------------------


def run_nnx(name: str, make: Callable[[str | None], nnx.Module], lr: float) -> list[dict[str, Any]]:
    """``make(model_axis)`` builds the hypernetwork (under the current mesh, if any)."""
    x, y = data()

    def loss_of(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            output, _ = nnx.merge(graphdef, params, rest)(x)
            return jnp.mean((output - y) ** 2)

        return loss_fn

    graphdef, start, rest = nnx.split(make(None), nnx.Param, ...)
    reference = nnx.to_pure_dict(train(loss_of(graphdef, rest), lr, start, x, y)[0])
    start_values = nnx.to_pure_dict(start)
    rows = []

    data_mesh, model_mesh = meshes()
    batch, replicated = NamedSharding(data_mesh, P("data")), NamedSharding(data_mesh, P())
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    params, rest_r = jax.device_put(start, replicated), jax.device_put(rest, replicated)
    trained, hlo = train(loss_of(graphdef, rest_r), lr, params, xs, ys)
    rows.append(
        {
            "name": name,
            "run": "batch",
            "batch_devices": len(xs.sharding.device_set),
            "params_replicated": all(
                p.sharding.is_fully_replicated for p in jax.tree.leaves(trained)
            ),
            "max_diff": distance(nnx.to_pure_dict(trained), reference),
            "min_moved": least_moved(reference, start_values),
            **collectives(hlo),
        }
    )

    with jax.set_mesh(model_mesh):
        hn = make("model")  # created split: nnx eager sharding
        graphdef, params, rest = nnx.split(hn, nnx.Param, ...)
        batch = NamedSharding(model_mesh, P("data"))
        xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
        trained, hlo = train(loss_of(graphdef, rest), lr, params, xs, ys)
        spec = nnx.get_partition_spec(params)["weight_generator"]["linear"]["kernel"]
    kernel = params["weight_generator"]["linear"]["kernel"][...]
    rows.append(
        {
            "name": name,
            "run": "batch+model",
            "metadata_spec": list(spec.get_value()),
            "batch_devices": len(xs.sharding.device_set),
            "init_diff": distance(nnx.to_pure_dict(params), start_values),
            "max_diff": distance(nnx.to_pure_dict(trained), reference),
            "min_moved": least_moved(reference, start_values),
            "kernel_shape": list(kernel.shape),
            "kernel": describe(kernel),
            "trained_kernel": describe(trained["weight_generator"]["linear"]["kernel"][...]),
            **collectives(hlo),
        }
    )
    return rows


# -- errors ---------------------------------------------------------------------------------------


def error_of(fn: Callable[[], Any]) -> dict[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, the test checks type and message
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "none", "message": ""}


def errors(generated: dict[str, Any]) -> list[dict[str, Any]]:
    """``model_axis`` misuse: no such mesh axis, an Explicit axis, a chunk size it cannot split
    (the committed ``generated_examples/*_mlp_*_static.py`` have ``CHUNK_DIM = 71``), a custom
    weight generator."""
    x = data()[0]
    data_mesh, model_mesh = meshes()
    explicit = jax.make_mesh(
        (2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )

    def linen(cls: type, **kwargs: Any) -> Callable[[], Any]:
        return lambda: cls(model_axis="model", **kwargs).init(jax.random.key(0), x)

    def nnx_(cls: type, *args: Any, **kwargs: Any) -> Callable[[], Any]:
        return lambda: cls(*args, model_axis="model", rngs=nnx.Rngs(0), **kwargs)

    runtime_linen = linen(FlaxHyperNetwork, target_network=MLP(), chunk_dim=CHUNK_DIM)
    builds = {
        "runtime_linen": (data_mesh, explicit, runtime_linen),
        "runtime_linen_odd": (
            model_mesh,
            linen(FlaxHyperNetwork, target_network=MLP(), chunk_dim=25),
        ),
        "runtime_nnx_odd": (
            model_mesh,
            nnx_(NNXHyperNetwork, NNXMLP(rngs=nnx.Rngs(0)), chunk_dim=25),
        ),
    }
    for name, module in generated.items():
        make = linen if name.startswith("linen") else nnx_
        builds[name] = (data_mesh, explicit, make(hypernetwork_class(module)))
    examples = Path(__file__).resolve().parents[1] / "generated_examples"
    for name in ("linen_mlp_linen_static", "nnx_mlp_nnx_static"):
        module = import_file(examples / f"{name}.py")
        make = linen if name.startswith("linen") else nnx_
        builds[f"{name}_odd"] = (model_mesh, make(hypernetwork_class(module)))

    rows = []
    for name, (*meshes_, build) in builds.items():
        for mesh in meshes_:
            with jax.set_mesh(mesh):
                error = error_of(build)
            rows.append(
                {
                    "error": name,
                    "mesh": str(dict(mesh.shape)),
                    "types": str(mesh.axis_types),
                    **error,
                }
            )
    rows.append(
        {
            "error": "runtime_custom_generator",
            "mesh": "none",
            **error_of(
                lambda: FlaxHyperNetwork(
                    MLP(), weight_generator_constructor=LinearWeightGenerator, model_axis="model"
                ).init(jax.random.key(0), x)
            ),
        }
    )
    return rows


# -- generated files ------------------------------------------------------------------------------


def import_file(path: Path) -> Any:
    name = f"_sharding_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def hypernetwork_class(module: Any) -> type:
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return cls


def main(paths: list[str]) -> None:
    for mode in ("static", "dynamic"):
        rows = run_linen(
            f"runtime_linen_{mode}",
            lambda axis, mode=mode: FlaxHyperNetwork(
                MLP(), mode=mode, chunk_dim=CHUNK_DIM, model_axis=axis
            ),
            LR,
        )
        rows += run_nnx(
            f"runtime_nnx_{mode}",
            lambda axis, mode=mode: NNXHyperNetwork(
                NNXMLP(rngs=nnx.Rngs(0)),
                mode=mode,
                chunk_dim=CHUNK_DIM,
                condition_dim=8,
                model_axis=axis,
                rngs=nnx.Rngs(1),
            ),
            LR,
        )
        for row in rows:
            print(json.dumps(row), flush=True)
    generated = {}
    for path in map(Path, paths):
        module = import_file(path)
        generated[path.stem] = module
        cls = hypernetwork_class(module)
        if path.stem.startswith("linen"):
            rows = run_linen(path.stem, lambda axis, cls=cls: cls(model_axis=axis), LR_GENERATED)
        else:
            make = lambda axis, cls=cls: cls(model_axis=axis, rngs=nnx.Rngs(1))  # noqa: E731
            rows = run_nnx(path.stem, make, LR_GENERATED)
        for row in rows:
            print(json.dumps({**row, "chunk_dim": module.CHUNK_DIM}), flush=True)
    for row in errors(generated):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
