"""Compare committed Linen/NNX files against copies of older ones: same init, same inputs ->
outputs, state updates and gradients equal to float rounding. Usage:

    python tests/compare_old_flax_files.py OLD_ROOT   # OLD_ROOT holds the old files, same paths

e.g. OLD_ROOT made with `git show main:generated_examples/nnx_cnn_nnx_dynamic.py > ...`. Each
file runs in eval and training mode (where the target has BatchNorm/Dropout), and, in dynamic
mode, on the fused and the materialising path (``return_params=True``).
"""

# ruff: noqa: B023 - each closure is called inside the iteration that defines it

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def example_inputs(source: str, batch: int = 3) -> tuple:
    """The ``__main__`` block's inputs, with ``batch`` samples of random values."""
    main = source[source.index('if __name__ == "__main__":') :]
    specs = re.findall(r"jnp\.zeros\(\(([\d, ]+)\), dtype=jnp\.(\w+)\)", main)
    key = jax.random.key(1)
    inputs = []
    for shape, dtype in specs:
        shape = (batch, *[int(s) for s in shape.split(",") if s.strip()][1:])
        key, sub = jax.random.split(key)
        if dtype.startswith("int"):
            inputs.append(jax.random.randint(sub, shape, 0, 8, getattr(jnp, dtype)))
        else:
            inputs.append(jax.random.normal(sub, shape, getattr(jnp, dtype)))
    return tuple(inputs)


def same(a, b, what: str) -> float:
    """Assert two trees equal to float rounding; the largest absolute difference."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: tree structures differ"
    worst = 0.0
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=what)
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
    return worst


def compare_linen(old, new, source: str) -> float:
    cls = next(k for k in vars(new) if k.endswith("HyperNetwork"))
    a, b = getattr(new, cls)(), getattr(old, cls)()
    inputs = example_inputs(source)
    variables = jax.jit(a.init)(jax.random.key(0), *inputs)
    worst = same(variables, jax.jit(b.init)(jax.random.key(0), *inputs), "init")
    dynamic = "CONDITION_SHAPE" in vars(new)
    train = "train" in inspect.signature(type(a.target_network).__call__).parameters
    for kwargs in ({}, {"return_params": True}) if dynamic else ({},):
        for extra in ({}, {"train": True}) if train else ({},):
            mutable = list(new.STATE_COLLECTIONS) if extra else False
            rngs = {"dropout": jax.random.key(2)}
            results = []
            for h in (a, b):

                def loss(params, h=h):
                    out = h.apply(
                        {**variables, "params": params},
                        *inputs,
                        rngs=rngs,
                        mutable=mutable,
                        **kwargs,
                        **extra,
                    )
                    (y, flat), updates = out if mutable else (out, {})
                    return jnp.sum(jnp.square(y.astype(jnp.float32))), (y, flat, updates)

                results.append(jax.jit(jax.grad(loss, has_aux=True))(variables["params"]))
            worst = max(worst, same(results[0], results[1], f"{kwargs} {extra}"))
    return worst


def compare_nnx(old, new, source: str) -> float:
    from flax import nnx

    cls = next(k for k in vars(new) if k.endswith("HyperNetwork"))
    inputs = example_inputs(source)
    dynamic = "CONDITION_SHAPE" in vars(new)
    worst = 0.0
    for kwargs in ({}, {"return_params": True}) if dynamic else ({},):
        for train in (False, True):
            results = []
            for module in (new, old):
                h = getattr(module, cls)(rngs=nnx.Rngs(0))
                h.train() if train else h.eval()

                def loss(h):
                    y, flat = h(*inputs, **kwargs)
                    return jnp.sum(jnp.square(y.astype(jnp.float32))), (y, flat)

                (_, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(h)
                state = nnx.state(h.target, nnx.Not(nnx.Param))
                after = [v.get_value() for _, v in nnx.to_flat_state(state)]
                params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(h, nnx.Param))]
                paths = [tuple(p) for p, _ in nnx.to_flat_state(grads)]
                grads = [v.get_value() for _, v in nnx.to_flat_state(grads)]
                results.append((paths, (aux, grads, after, params)))
            assert results[0][0] == results[1][0], "parameter paths differ"
            worst = max(worst, same(results[0][1], results[1][1], f"{kwargs} train={train}"))
    return worst


def compare(old_path: Path, new_path: Path) -> float:
    old, new = load(old_path, "old_" + new_path.stem), load(new_path, "new_" + new_path.stem)
    source = new_path.read_text()
    if "from flax import nnx" in source:
        return compare_nnx(old, new, source)
    return compare_linen(old, new, source)


def main() -> None:
    old_root = Path(sys.argv[1])
    for old in sorted([*old_root.rglob("*_linen_*.py"), *old_root.rglob("*_nnx_*.py")]):
        new = ROOT / old.relative_to(old_root)
        print(f"{new.relative_to(ROOT)}: ", end="", flush=True)
        print(f"max |difference| {compare(old, new):.3g}", flush=True)


if __name__ == "__main__":
    main()
