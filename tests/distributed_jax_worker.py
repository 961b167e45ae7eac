"""Worker for tests/test_sharding_jax.py: one of several JAX processes (``jax.distributed``).

    python tests/distributed_jax_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR STEPS LR FILE...

Each process sees 2 CPU devices (``--xla_force_host_platform_device_count=2``) and joins the
others through ``jax.distributed.initialize(coordinator_address="localhost:PORT", ...)``
(collectives over gloo), so ``jax.devices()`` lists ``2 * NUM_PROCESSES`` devices. For every
generated Linen/NNX file it builds the hypernetwork with ``model_axis="model"`` under
``jax.set_mesh`` of a ``(NUM_PROCESSES, 2)`` mesh ``("data", "model")``: the batch is split over
the processes (each gives its own rows, ``jax.make_array_from_process_local_data``), the weight
generator's output over each process's 2 devices. After ``STEPS`` SGD steps (learning rate
``LR``; the global batch is ``BATCH`` = 16 samples from ``jax.random.key(0)``) process 0 writes
the parameters, gathered, to ``OUT_DIR/<file stem>.npz``; every process prints one JSON line with
its generator kernel's partition spec and local shard shapes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402 - after XLA_FLAGS
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

BATCH = 16


def data() -> tuple[np.ndarray, np.ndarray]:
    """The global batch: the same on every process, and in the test's single-process run."""
    kx, ky = jax.random.split(jax.random.key(0))
    return np.asarray(jax.random.normal(kx, (BATCH, 8))), np.asarray(
        jax.random.normal(ky, (BATCH, 4))
    )


def hypernetwork_class(path: Path) -> type:
    name = f"_distributed_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    (cls,) = [v for k, v in vars(module).items() if k.endswith("HyperNetwork")]
    return cls


def train(
    path: Path, mesh: Mesh, process: int, processes: int, steps: int, lr: float
) -> tuple[Any, jax.Array]:
    """The trained parameters (a pure dict) and the generator kernel."""
    cls = hypernetwork_class(path)
    x, y = data()
    rows = np.array_split(np.arange(BATCH), processes)[process]  # this process's samples
    batch = NamedSharding(mesh, P("data"))
    xs = jax.make_array_from_process_local_data(batch, x[rows], x.shape)
    ys = jax.make_array_from_process_local_data(batch, y[rows], y.shape)
    if path.stem.startswith("linen"):
        hn = cls(model_axis="model")
        abstract = jax.eval_shape(hn.init, jax.random.key(1), xs)
        init = jax.jit(hn.init, out_shardings=nn.get_sharding(abstract, mesh))
        params = init(jax.random.key(1), xs)["params"]

        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            return jnp.mean((hn.apply({"params": params}, x)[0] - y) ** 2)

    else:
        graphdef, params, rest = nnx.split(
            cls(model_axis="model", rngs=nnx.Rngs(1)), nnx.Param, ...
        )

        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            return jnp.mean((nnx.merge(graphdef, params, rest)(x)[0] - y) ** 2)

    optimizer = optax.sgd(lr)

    @jax.jit
    def step(params, opt_state, x, y):  # noqa: ANN001, ANN202
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state, xs, ys)
        # one step at a time: with CPU (gloo) collectives, queued steps hung here (jax 0.10.2)
        jax.block_until_ready(params)
    kernel = params["weight_generator"]["linear"]["kernel"]
    kernel = kernel.value if isinstance(kernel, nn.Partitioned) else kernel[...]
    values = nn.meta.unbox(params) if path.stem.startswith("linen") else nnx.to_pure_dict(params)
    return values, kernel


def main() -> None:
    process, processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    steps, lr = int(sys.argv[5]), float(sys.argv[6])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=processes, process_id=process
    )
    mesh = Mesh(np.array(jax.devices()).reshape(processes, 2), ("data", "model"))
    for path in map(Path, sys.argv[7:]):
        with jax.set_mesh(mesh):
            values, kernel = train(path, mesh, process, processes, steps, lr)
            gathered = multihost_utils.process_allgather(values, tiled=True)
        if process == 0:
            flat = jax.tree_util.tree_flatten_with_path(gathered)[0]
            arrays = {jax.tree_util.keystr(keys): np.asarray(v) for keys, v in flat}
            np.savez(Path(out) / f"{path.stem}.npz", **arrays)
        row = {
            "file": path.stem,
            "process": process,
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "spec": list(kernel.sharding.spec),
            "local_shards": sorted(tuple(s.data.shape) for s in kernel.addressable_shards),
        }
        print(json.dumps(row), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
