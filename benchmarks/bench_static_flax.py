"""Static Flax fast path (issue 18) vs the flat vector vs the plain target, one process.

    python benchmarks/bench_static_flax.py GENERATED.py {linen,nnx} BATCH IN_FEATURES SECONDS

GENERATED.py: a static Linen/NNX file of an MLP target (Linen: class ``MLP``; NNX:
``make_target()``). Candidates, each ``jax.jit(jax.value_and_grad(mean squared output))``:
the plain target with its own parameters, the file's default call (``LOW_RANK`` layers at
rank D) and ``return_params=True`` (the flat vector). Interleaved rounds, the starting
candidate rotating, for SECONDS (at least 20); medians and ratios to the target.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def load(path: str) -> Any:  # noqa: ANN401
    spec = importlib.util.spec_from_file_location("generated", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["generated"] = module  # Flax dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def compiled(loss: Callable, state: Any) -> Callable[[], Any]:  # noqa: ANN401
    step = jax.jit(jax.value_and_grad(loss))
    return lambda: step(state)


def candidates(module: Any, framework: str, x: jax.Array) -> dict[str, Callable[[], Any]]:  # noqa: ANN401
    hn_class = next(v for k, v in vars(module).items() if k.endswith("HyperNetwork"))
    if framework == "linen":
        hn, target = hn_class(), module.MLP()
        params = hn.init(jax.random.key(0), x)["params"]
        own = target.init(jax.random.key(1), x)

        def run(p: Any, return_params: bool) -> jax.Array:  # noqa: ANN401
            return hn.apply({"params": p}, x, return_params=return_params)[0]

        plain = compiled(lambda p: jnp.mean(target.apply(p, x) ** 2), own)
    else:
        hn, target = hn_class(rngs=nnx.Rngs(0)), module.make_target()
        graphdef, params, rest = nnx.split(hn, nnx.Param, ...)
        tdef, tparams, trest = nnx.split(target, nnx.Param, ...)

        def run(p: Any, return_params: bool) -> jax.Array:  # noqa: ANN401
            return nnx.merge(graphdef, p, rest, copy=True)(x, return_params=return_params)[0]

        def target_loss(p: Any) -> jax.Array:  # noqa: ANN401
            return jnp.mean(nnx.merge(tdef, p, trest, copy=True)(x) ** 2)

        plain = compiled(target_loss, tparams)
    return {
        "target": plain,
        "fast": compiled(lambda p: jnp.mean(run(p, False) ** 2), params),
        "flat": compiled(lambda p: jnp.mean(run(p, True) ** 2), params),
    }


def main() -> None:
    path, framework, batch, width, seconds = sys.argv[1:6]
    x = jax.random.normal(jax.random.key(3), (int(batch), int(width)))
    steps = candidates(load(path), framework, x)
    for step in steps.values():  # compile, warm up
        jax.block_until_ready(step())
        jax.block_until_ready(step())
    names, times = list(steps), {name: [] for name in steps}
    start, rounds = time.perf_counter(), 0
    while rounds < 20 or time.perf_counter() - start < float(seconds):
        for name in names[rounds % 3 :] + names[: rounds % 3]:
            begin = time.perf_counter()
            jax.block_until_ready(steps[name]())
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    base = statistics.median(times["target"])
    cells = [
        f"{n} {statistics.median(t) * 1e3:.3f} ms ({statistics.median(t) / base:.2f}x)"
        for n, t in times.items()
    ]
    print(f"{framework} {path} batch {batch}: " + ", ".join(cells) + f", rounds {rounds}")


if __name__ == "__main__":
    main()
