"""Speed of Flax hypernetworks, dynamic and static: the target alone, the runtime, generated files.

    python benchmarks/bench_flax.py [--quick] [--seconds 4]

Prints one Markdown table (``bench_hypernets.py`` includes it as its Flax section). Targets:
Linen MLPs 8-256-256-4 (tanh; the seed MLP) and 64-1024-1024-10 (ReLU). Candidates, each a
``jax.jit``-compiled forward+backward (``jax.value_and_grad`` of the mean squared output with
respect to every parameter):

* the target alone: the plain Linen module on the batch with its own parameters;
* the runtime ``FlaxHyperNetwork(mode="dynamic")``: ``jax.vmap`` over the samples with
  materialised per-sample weights (``batch x P`` values);
* the generated module (``hypernn-gen --backend flax --mode dynamic``), default fused path:
  shared stacked weights, one GEMM per layer, no per-sample weights;
* the generated static module (``--mode static``): one weight set for the whole batch.

Before timing, each generated module is checked against its runtime twin (``FlaxHyperNetwork``
in the same mode) with the runtime's variables (outputs and gradients).

Timing: after a compile and a warm-up call, the candidates run
round-robin (the starting candidate rotating every round) for ``--seconds`` per cell; the table
gives medians and ratios to the target alone. Interleaving with the runtime, which allocates
``batch x P`` values per call (GiBs for the 1.1M-parameter MLP at batch 256), slows the calls
after it; the fused figures of the large cells are upper bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

MLP_SOURCE = '''\
"""A Linen MLP {sizes} ({act}): a temporary target of bench_flax.py."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for width in {hidden}:
            x = nn.{act}(nn.Dense(width)(x))
        return nn.Dense({out}, use_bias={bias})(x)


example_input = jnp.zeros((1, {inputs}))
'''
#: key -> (label, layer sizes, activation, output bias)
TARGETS = {
    "seed": ("MLP 8-256-256-4", (8, 256, 256, 4), "tanh", False),
    "mlp": ("MLP 64-1024-1024-10", (64, 1024, 1024, 10), "relu", True),
}
BATCHES = (64, 256)


def write_target(key: str, tmp: Path) -> Path:
    _, sizes, act, bias = TARGETS[key]
    path = tmp / f"bench_flax_{key}.py"
    path.write_text(
        MLP_SOURCE.format(
            sizes="-".join(map(str, sizes)),
            act=act,
            hidden=list(sizes[1:-1]),
            out=sizes[-1],
            bias=bias,
            inputs=sizes[0],
        )
    )
    return path


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_flax_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def candidates(key: str, tmp: Path, batch: int) -> tuple[dict[str, Callable[[], Any]], int]:
    """The compiled steps of the three candidates (checked against each other) and P."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hypernn_gen.cli import main as cli
    from hypernn_gen.runtime.flax import FlaxHyperNetwork

    target_file = write_target(key, tmp)
    files = {}
    for mode in ("dynamic", "static"):
        out = tmp / f"bench_flax_{key}_linen_{mode}.py"
        if not out.exists():
            args = [str(target_file), "--backend", "flax", "--mode", mode, "-o", str(out)]
            with contextlib.redirect_stdout(sys.stderr):
                assert cli(args) == 0
        files[mode] = import_file(out)
    generated = files["dynamic"]
    target = import_file(target_file).MLP()
    hn_class, static_class = (
        next(v for k, v in vars(files[mode]).items() if k.endswith("HyperNetwork"))
        for mode in ("dynamic", "static")
    )
    runtime, fused = FlaxHyperNetwork(target, mode="dynamic"), hn_class()
    runtime_static, static = FlaxHyperNetwork(target, mode="static"), static_class()

    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, TARGETS[key][1][0])), "float32"
    )
    own = jax.jit(target.init)(jax.random.key(1), x)
    variables = jax.jit(runtime.init)(jax.random.key(0), x)
    static_variables = jax.jit(runtime_static.init)(jax.random.key(2), x)

    def step(module: Any, variables: Any) -> Callable[[], Any]:
        def loss(params: Any) -> tuple[jax.Array, jax.Array]:
            out = module.apply({**variables, "params": params}, x)
            out = out[0] if isinstance(out, tuple) else out
            return jnp.mean(out**2), out

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return lambda: grad(variables["params"])

    steps = {
        "target alone": step(target, own),
        "runtime (vmap, materialising)": step(runtime, variables),
        "generated (fused)": step(fused, variables),
        "generated static": step(static, static_variables),
    }
    checks = (
        ("generated (fused)", step(runtime, variables)),
        ("generated static", step(runtime_static, static_variables)),
    )
    for name, reference in checks:  # each generated module against its runtime twin
        (_, want), want_grads = reference()
        (_, got), got_grads = steps[name]()
        for a, b in zip(
            jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads)), strict=True
        ):
            error = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            if error > 1e-4:
                raise SystemExit(f"MISMATCH: {name} vs runtime, {key} batch {batch}: {error:.2e}")
    flat = sum(p.size for p in generated.GENERATED)
    return steps, flat


def time_cell(steps: dict[str, Callable[[], Any]], seconds: float, min_rounds: int) -> dict:
    """Median seconds per call of every candidate, interleaved round-robin."""
    import jax

    names = list(steps)
    for name in names:  # compile and warm up
        jax.block_until_ready(steps[name]())
        jax.block_until_ready(steps[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            begin = time.perf_counter()
            jax.block_until_ready(steps[name]())
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()} | {"rounds": rounds}


def table(quick: bool, seconds: float) -> str:
    keys = ("seed",) if quick else tuple(TARGETS)
    batches = (16,) if quick else BATCHES
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_flax_") as tmp:
        for key in keys:
            for batch in batches:
                print(f"bench_flax: {TARGETS[key][0]}, batch {batch}", file=sys.stderr, flush=True)
                steps, flat = candidates(key, Path(tmp), batch)
                rows.append((key, batch, flat, time_cell(steps, seconds, 2 if quick else 3)))
    names = list(rows[0][3])[:-1]
    lines = [
        "| target | P | batch | " + " | ".join(names) + " | fused vs runtime | rounds |",
        "|---|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for key, batch, flat, cell in rows:
        base = cell["target alone"]
        cells = [f"{cell[n] * 1e3:.2f} ms ({cell[n] / base:.1f}x)" for n in names]
        faster = cell["runtime (vmap, materialising)"] / cell["generated (fused)"]
        lines.append(
            f"| {TARGETS[key][0]} | {flat:,} | {batch} | "
            + " | ".join(cells)
            + f" | {faster:.1f}x faster | {cell['rounds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed MLP, batch 16, short cells")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per cell (default 4)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(table(args.quick, 0.3 if args.quick else args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
