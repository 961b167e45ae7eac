"""Flax dynamic fused path against the target alone, Linen and NNX, before/after a change.

    python benchmarks/bench_flax_fused.py [--threads 1] [--before /path/to/other/checkout]
        [--batch 64] [--seconds 8]

For the MLPs of ``bench_flax.py`` (8-256-256-4 tanh, 64-1024-1024-10 ReLU), written as Linen and
as NNX targets, generates the dynamic files with this checkout (and, with ``--before``, with the
generator of another checkout, in a subprocess with that checkout on ``PYTHONPATH``) and times
the jitted forward+backward (``jax.value_and_grad`` of the mean squared output) of the target
alone and of each generated module (default fused path), round-robin in one process, the
starting candidate rotating every round. Prints medians and ratios to the target alone.
``--threads 1``: one XLA CPU thread (set before JAX is imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "seed": ("MLP 8-256-256-4", (8, 256, 256, 4), "tanh", False),
    "mlp": ("MLP 64-1024-1024-10", (64, 1024, 1024, 10), "relu", True),
}
NNX_SOURCE = '''\
"""An NNX MLP {sizes} ({act}): a temporary target of bench_flax_fused.py."""

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l0 = nnx.Linear({s0}, {s1}, rngs=rngs)
        self.l1 = nnx.Linear({s1}, {s2}, rngs=rngs)
        self.l2 = nnx.Linear({s2}, {s3}, use_bias={bias}, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jax.nn.{act}(self.l1(jax.nn.{act}(self.l0(x)))))


def make_target() -> MLP:
    return MLP(nnx.Rngs(0))


example_input = jnp.zeros((1, {s0}))
'''


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_fused_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_targets(key: str, tmp: Path) -> dict[str, str]:
    """The Linen and NNX targets of ``key``: api -> CLI target argument."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_flax

    _, sizes, act, bias = TARGETS[key]
    nnx_file = tmp / f"nnx_{key}.py"
    s0, s1, s2, s3 = sizes
    nnx_file.write_text(
        NNX_SOURCE.format(
            sizes="-".join(map(str, sizes)), act=act, bias=bias, s0=s0, s1=s1, s2=s2, s3=s3
        )
    )
    return {"linen": str(bench_flax.write_target(key, tmp)), "nnx": f"{nnx_file}:make_target"}


def generate(target: str, out: Path, checkout: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "hypernn_gen",
        target,
        "--backend",
        "flax",
        "--mode",
        "dynamic",
        "-o",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, cwd=checkout)
    return out


def steps_for(api: str, target_arg: str, files: dict[str, Path], batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    file, _, factory = target_arg.partition(":")
    target_module = import_file(Path(file))
    inputs = target_module.example_input.shape[1]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, inputs)), "float32")

    def first(out: Any) -> Any:
        return out[0] if isinstance(out, tuple) else out

    if api == "linen":

        def linen_step(module: Any, seed: int) -> Callable[[], Any]:
            variables = jax.jit(module.init)(jax.random.key(seed), x)

            def loss(params: Any) -> jax.Array:
                return jnp.mean(first(module.apply({**variables, "params": params}, x)) ** 2)

            grad = jax.jit(jax.value_and_grad(loss))
            return lambda: grad(variables["params"])

        steps = {"target alone": linen_step(target_module.MLP(), 1)}
        for name, path in files.items():
            generated = import_file(path)
            cls = next(v for k, v in vars(generated).items() if k.endswith("HyperNetwork"))
            steps[name] = linen_step(cls(), 0)
        return steps
    from flax import nnx

    def nnx_step(model: Any) -> Callable[[], Any]:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p: Any) -> jax.Array:
            return jnp.mean(first(nnx.merge(graphdef, p, rest)(x)) ** 2)

        grad = jax.jit(jax.value_and_grad(loss))
        return lambda: grad(params)

    steps = {"target alone": nnx_step(getattr(target_module, factory)())}
    for name, path in files.items():
        generated = import_file(path)
        cls = next(v for k, v in vars(generated).items() if k.endswith("HyperNetwork"))
        steps[name] = nnx_step(cls(rngs=nnx.Rngs(0)))
    return steps


def time_cell(steps: dict[str, Callable[[], Any]], seconds: float) -> tuple[dict, int]:
    import jax

    names = list(steps)
    for name in names:  # compile and warm up
        jax.block_until_ready(steps[name]())
        jax.block_until_ready(steps[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or time.perf_counter() - start < seconds:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            begin = time.perf_counter()
            jax.block_until_ready(steps[name]())
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="XLA CPU threads (0: JAX's)")
    parser.add_argument("--before", type=Path, help="another checkout to generate 'before' with")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per cell (default 8)")
    args = parser.parse_args(argv)
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    print("| target | API | batch | target alone | generated | ratio | rounds |")
    print("|---|---|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench_flax_fused_") as tmp_name:
        tmp = Path(tmp_name)
        for key in TARGETS:
            for api, target_arg in write_targets(key, tmp).items():
                files = {}
                if args.before is not None:
                    out = tmp / f"{api}_{key}_before.py"
                    files["before"] = generate(target_arg, out, args.before.resolve())
                files["after"] = generate(target_arg, tmp / f"{api}_{key}_after.py", ROOT)
                print(f"bench_flax_fused: {key} {api}", file=sys.stderr, flush=True)
                cell, rounds = time_cell(
                    steps_for(api, target_arg, files, args.batch), args.seconds
                )
                base = cell["target alone"]
                for name in files:
                    print(
                        f"| {TARGETS[key][0]} | {api} | {args.batch} | {base * 1e3:.2f} ms | "
                        f"{name}: {cell[name] * 1e3:.2f} ms | {cell[name] / base:.2f}x | {rounds} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
