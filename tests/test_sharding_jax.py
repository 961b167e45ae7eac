"""Flax hypernetworks train sharded over a jax Mesh exactly as unsharded; ``model_axis`` splits
the weight generator's output.

``tests/sharding_jax_worker.py`` runs in a subprocess (``XLA_FLAGS`` must name the 4 host
devices before jax is imported). For the runtime ``FlaxHyperNetwork``/``NNXHyperNetwork`` and
generated Linen and NNX files (static and dynamic; generated here with ``--chunk-dim 72`` so
that 2 devices split a chunk) it runs ``STEPS`` = 5 SGD steps of one jitted train step:

* unsharded, ``model_axis=None``: the reference;
* ``batch``: the batch sharded over 4 CPU devices (``NamedSharding(mesh, P("data"))``), the
  parameters replicated;
* ``batch+model``: a 2x2 ``Mesh(("data", "model"))`` under ``jax.set_mesh``, the batch on
  ``"data"`` and the hypernetwork built with ``model_axis="model"``.

Both must end at the reference's parameters within ``ATOL`` = 1e-6 absolute (measured: at most
1.2e-7; every parameter moves by more than 10 * ATOL), start from the same values (measured:
identical), and compile to a step with all-reduces (XLA split the batch and sums the gradients).
With ``model_axis`` the generator kernel ``(EMBEDDING_DIM, CHUNK_DIM)`` is split on ``"model"``
(spec ``P(None, "model")``, shards ``(EMBEDDING_DIM, CHUNK_DIM / 2)``) when created and after
training, and the compiled step all-gathers the split output for the target.

Several processes: ``tests/distributed_jax_worker.py`` runs twice at once, each process with 2
CPU devices, joined by ``jax.distributed.initialize(coordinator_address="localhost:PORT")``; on a
(2, 2) mesh the batch is split over the processes and the generator's output over each one's
devices. After 5 steps the gathered parameters of a generated Linen (static) and NNX (dynamic)
hypernetwork equal one unsharded process within ``ATOL`` (measured: 1.5e-8).

``model_axis`` misuse fails with a one-line error, and without a mesh ``model_axis`` changes no
value (Linen: the parameters are only boxed in ``nn.Partitioned``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from gen_support import import_file  # noqa: E402

from hypernn_gen.cli import main as cli_main  # noqa: E402

WORKER = Path(__file__).resolve().with_name("sharding_jax_worker.py")
DISTRIBUTED_WORKER = WORKER.with_name("distributed_jax_worker.py")
REPO = WORKER.parents[1]
TARGETS = REPO / "generated_examples" / "targets"
ATOL = 1e-6
CHUNK_DIM = 72
EMBEDDING_DIM = 32
GENERATED = [f"{api}_mlp_{mode}" for api in ("linen", "nnx") for mode in ("static", "dynamic")]
RUNTIME = [f"runtime_{api}_{mode}" for api in ("linen", "nnx") for mode in ("static", "dynamic")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MLP targets' Linen/NNX hypernetworks, static and dynamic, with chunks of 72."""
    out = tmp_path_factory.mktemp("sharding")
    paths = {}
    for name in GENERATED:
        api, _, mode = name.split("_")
        paths[name] = out / f"{name}.py"
        target = str(TARGETS / f"{api}_mlp.py")
        args = [target, "--backend", "flax", "--mode", mode, "--chunk-dim", str(CHUNK_DIM)]
        assert cli_main([*args, "-o", str(paths[name])]) == 0
    return paths


@pytest.fixture(scope="module")
def results(generated: dict[str, Path]) -> dict[str, list[dict]]:
    result = subprocess.run(
        [sys.executable, str(WORKER), *map(str, generated.values())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        key = row["name"] if "name" in row else f"error: {row['error']}"
        grouped.setdefault(key, []).append(row)
    return grouped


def run(results: dict[str, list[dict]], name: str, kind: str) -> dict:
    (row,) = [r for r in results[name] if r["run"] == kind]
    return row


@pytest.mark.parametrize("name", RUNTIME + GENERATED)
def test_batch_sharded_train_step_matches_unsharded(name: str, results: dict) -> None:
    row = run(results, name, "batch")
    assert row["batch_devices"] == 4, row
    assert row["params_replicated"], row
    assert row["all_reduces"] > 0, row
    assert row["min_moved"] > 10 * ATOL, row
    assert row["max_diff"] <= ATOL, row


@pytest.mark.parametrize("name", RUNTIME + GENERATED)
def test_model_axis_splits_the_generator_and_matches_unsharded(name: str, results: dict) -> None:
    row = run(results, name, "batch+model")
    chunk = row.get("chunk_dim", 24)  # the worker's runtime CHUNK_DIM
    assert row["batch_devices"] == 4, row
    assert row["kernel_shape"] == [EMBEDDING_DIM, chunk], row
    for kernel in (row["kernel"], row["trained_kernel"]):
        assert kernel == {
            "spec": [None, "model"],
            "shards": [[EMBEDDING_DIM, chunk // 2]],
            "devices": 4,
        }
    if "linen" in name:
        assert row["boxed"], row  # nn.Partitioned: the annotation nn.get_sharding reads
    else:
        assert row["metadata_spec"] == [None, "model"], row  # nnx.get_partition_spec
    assert row["all_reduces"] > 0 and row["all_gathers"] > 0, row
    assert row["init_diff"] <= ATOL, row
    assert row["min_moved"] > 10 * ATOL, row
    assert row["max_diff"] <= ATOL, row


NO_AXIS = (
    "the mesh has no axis 'model' (its axes: ('data',)); pass model_axis=<one of them> or None"
)
NOT_AUTO = (
    "mesh axis 'model' is not of type Auto; build the mesh with jax.sharding.Mesh(devices, names)"
)


@pytest.mark.parametrize("name", ["runtime_linen", *GENERATED])
def test_model_axis_needs_an_auto_mesh_axis_of_that_name(name: str, results: dict) -> None:
    error = "HyperNetworkError" if name.startswith("runtime") else "ValueError"
    by_mesh = {row["mesh"]: row for row in results[f"error: {name}"]}
    assert by_mesh["{'data': 4}"]["type"] == error
    assert by_mesh["{'data': 4}"]["message"] == NO_AXIS
    assert by_mesh["{'data': 2, 'model': 2}"]["type"] == error
    assert by_mesh["{'data': 2, 'model': 2}"]["message"].startswith(NOT_AUTO)


def test_model_axis_needs_a_chunk_size_it_splits(results: dict) -> None:
    for name in ("runtime_linen_odd", "runtime_nnx_odd"):
        (row,) = results[f"error: {name}"]
        assert row["type"] == "HyperNetworkError", row
        assert row["message"] == (
            "the chunk size 25 does not split over the 2 devices of mesh axis 'model'; "
            "use a chunk size that is a multiple of 2 (runtime: chunk_dim=..., generated file: "
            "regenerate with --chunk-dim)"
        )
    for name in ("linen_mlp_linen_static_odd", "nnx_mlp_nnx_static_odd"):  # committed: 71
        (row,) = results[f"error: {name}"]
        assert row["type"] == "ValueError", row
        assert row["message"] == (
            "the chunk size 71 does not split over the 2 devices of mesh axis 'model'; "
            "use a chunk size that is a multiple of 2 (runtime: chunk_dim=..., generated file: "
            "regenerate with --chunk-dim)"
        )
    (row,) = results["error: runtime_custom_generator"]
    assert row["type"] == "HyperNetworkError"
    assert row["message"].startswith("model_axis splits the default weight generator only")


# -- without a mesh (this process, one device) ----------------------------------------------------


def hypernetwork_class(path: Path) -> type:
    (cls,) = [v for k, v in vars(import_file(path)).items() if k.endswith("HyperNetwork")]
    return cls


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_model_axis_without_a_mesh_changes_no_value_linen(mode: str) -> None:
    cls = hypernetwork_class(REPO / "generated_examples" / f"linen_mlp_linen_{mode}.py")
    x = jax.random.normal(jax.random.key(0), (3, 8))
    plain = cls().init(jax.random.key(1), x)
    annotated = cls(model_axis="model").init(jax.random.key(1), x)
    kernel = annotated["params"]["weight_generator"]["linear"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    unboxed = nn.meta.unbox(annotated)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), unboxed, plain))
    kwargs = {"return_params": True} if mode == "dynamic" else {}  # both materialise
    out, flat = cls(model_axis="model").apply(annotated, x, **kwargs)
    ref_out, ref_flat = cls().apply(plain, x, **kwargs)
    assert jnp.array_equal(out, ref_out) and jnp.array_equal(flat, ref_flat)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_model_axis_without_a_mesh_changes_no_value_nnx(mode: str) -> None:
    cls = hypernetwork_class(REPO / "generated_examples" / f"nnx_mlp_nnx_{mode}.py")
    x = jax.random.normal(jax.random.key(0), (3, 8))
    plain, annotated = cls(rngs=nnx.Rngs(1)), cls(model_axis="model", rngs=nnx.Rngs(1))
    specs = nnx.get_partition_spec(nnx.state(annotated.weight_generator))
    assert specs["linear"]["kernel"].get_value() == jax.sharding.PartitionSpec(None, "model")
    assert specs["linear"]["bias"].get_value() == jax.sharding.PartitionSpec("model")
    same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)),
        nnx.to_pure_dict(nnx.state(annotated, nnx.Param)),
        nnx.to_pure_dict(nnx.state(plain, nnx.Param)),
    )
    assert jax.tree.all(same)
    kwargs = {"return_params": True} if mode == "dynamic" else {}  # both materialise
    (out, flat), (ref_out, ref_flat) = annotated(x, **kwargs), plain(x, **kwargs)
    assert jnp.array_equal(out, ref_out) and jnp.array_equal(flat, ref_flat)


# -- several processes: jax.distributed ------------------------------------------------------------

DISTRIBUTED = ["linen_mlp_static", "nnx_mlp_dynamic"]
STEPS, LR = 5, 3e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(generated: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Two processes (``jax.distributed``, 2 CPU devices each) train two generated files."""
    out = tmp_path_factory.mktemp("distributed")
    port = str(free_port())
    files = [str(generated[name]) for name in DISTRIBUTED]
    procs = [
        subprocess.Popen(
            [sys.executable, str(DISTRIBUTED_WORKER), str(i), "2", port, str(out)]
            + [str(STEPS), str(LR), *files],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    rows = [json.loads(line) for o in outputs for line in o.splitlines() if line.startswith("{")]
    return out, rows


def single_process_run(path: Path) -> dict[str, np.ndarray]:
    """The same training on one device, unsharded, ``model_axis=None``: leaf path -> values."""
    cls = hypernetwork_class(path)
    kx, ky = jax.random.split(jax.random.key(0))
    x, y = jax.random.normal(kx, (16, 8)), jax.random.normal(ky, (16, 4))
    if path.stem.startswith("linen"):
        hn = cls()
        params = jax.jit(hn.init)(jax.random.key(1), x)["params"]

        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            return jnp.mean((hn.apply({"params": params}, x)[0] - y) ** 2)

    else:
        graphdef, params, rest = nnx.split(cls(rngs=nnx.Rngs(1)), nnx.Param, ...)

        def loss_fn(params, x, y):  # noqa: ANN001, ANN202
            return jnp.mean((nnx.merge(graphdef, params, rest)(x)[0] - y) ** 2)

    optimizer = optax.sgd(LR)

    @jax.jit
    def step(params, opt_state, x, y):  # noqa: ANN001, ANN202
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    start = params
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state, x, y)
    if not path.stem.startswith("linen"):
        params, start = nnx.to_pure_dict(params), nnx.to_pure_dict(start)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, start)
    assert min(jax.tree.leaves(moved)) > 10 * ATOL  # every parameter moves
    return {jax.tree_util.keystr(keys): np.asarray(v) for keys, v in flat}


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_two_processes_train_like_one(name: str, distributed: tuple, generated: dict) -> None:
    """``jax.distributed.initialize`` on localhost, a (2, 2) mesh: the batch split over the two
    processes, the generator's output over each one's 2 devices; equal to one unsharded run."""
    out, rows = distributed
    mine = [row for row in rows if row["file"] == name]
    assert sorted(row["process"] for row in mine) == [0, 1]
    for row in mine:
        assert row["devices"] == 4 and row["local_devices"] == 2, row
        assert row["spec"] == [None, "model"], row
        assert row["local_shards"] == [[EMBEDDING_DIM, CHUNK_DIM // 2]] * 2, row
    found = dict(np.load(out / f"{name}.npz"))
    expected = single_process_run(generated[name])
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(found[key], value, rtol=0, atol=ATOL, err_msg=key)
