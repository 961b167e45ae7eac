"""Probe for issue 16 on Flax: the tiny GPT (Linen) and its static hypernetwork under optax.

The data, batches and steps of tests/test_training_sgd.py's char LM (300 steps of 32 windows of
16 characters), the target generated_examples/targets/linen_transformer.py and its generated
static hypernetwork generated_examples/linen_transformer_linen_static.py. Variants:

* ``shared``: the generated file as it is (one generator for every tensor);
* ``grouped:BASE:CHUNK:DIM[:ZERO_VAR[:BOOST[:raw]]]``: the design of benchmarks/probe_char_lm.py
  written functionally on the generated file's layout: the tensors grouped by init std on a
  log-BASE scale (zero-std tensors one group), each group its own N(0, 1) table (``DIM`` wide)
  and linear head (``CHUNK`` values), the multipliers from the group's mean init variance times
  ``BOOST``, every tensor's raw chunk normalised to unit RMS before the decode (``raw``: not
  normalised);
* ``aligned[:BOOST[:raw]]``: the design of hypernn_gen.design (``group_rows``,
  ``group_gradient_multipliers``) on the file's own tensor-aligned chunks, one table, a head
  per group, through the Flax kernel (``grouped_linear``, ``normalized``, ``decode``).

Run: ``python benchmarks/probe_char_lm_flax.py --seeds 1 2 3 --variants shared
grouped:2:124:32:1e-2:0.35``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_training_sgd import BATCH, STEPS, char_lm_data  # noqa: E402


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # Linen dataclasses look their module up
    spec.loader.exec_module(module)
    return module


GEN = load(REPO / "generated_examples" / "linen_transformer_linen_static.py")

OPTIMIZERS = {
    "sgd-0.5": lambda: optax.sgd(0.5),
    "momentum-0.05": lambda: optax.sgd(0.05, momentum=0.9),
    "adam-3e-3": lambda: optax.adam(3e-3),
}


def data() -> tuple[jax.Array, jax.Array, jax.Array]:
    import torch

    x, y = char_lm_data()
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randint(0, x.shape[0], (BATCH,), generator=g) for _ in range(STEPS)])
    return jnp.asarray(x.numpy()), jnp.asarray(y.numpy()), jnp.asarray(idx.numpy())


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(loss_fn: Any, params: Any, optimizer: str) -> float:
    x, y, idx = data()
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


def std_groups(base: float) -> list[list[int]]:
    keys: dict[object, list[int]] = {}
    for i, p in enumerate(GEN.GENERATED):
        key = "zero" if p.init_std == 0 else math.floor(math.log(p.init_std, base) + 0.5)
        keys.setdefault(key, []).append(i)
    return list(keys.values())


def unit_rms(raw: jax.Array) -> jax.Array:
    return raw / jnp.sqrt(jnp.mean(raw * raw) + 1e-12)


def grouped(spec: str, seed: int) -> tuple[Any, Any]:
    _, base, chunk, dim, *rest = spec.split(":")
    chunk, dim = int(chunk), int(dim)
    zero_var = float(rest[0]) if rest else 1e-2
    boost = float(rest[1]) if len(rest) > 1 else 1.0
    norm = len(rest) < 3  # a third field (``raw``): no normalisation
    groups = (
        std_groups(float(base)) if float(base) > 0 else [[i] for i in range(len(GEN.GENERATED))]
    )
    target = GEN.make_target()
    key = jax.random.key(seed)
    params: dict[str, Any] = {
        "scale": jnp.asarray([p.init_std for p in GEN.GENERATED], jnp.float32),
        "shift": jnp.asarray([p.init_mean for p in GEN.GENERATED], jnp.float32),
        "groups": [],
    }
    mults = []
    for group in groups:
        tensors = [GEN.GENERATED[i] for i in group]
        size = sum(p.size for p in tensors)
        n = -(-size // chunk)
        key, k1, k2 = jax.random.split(key, 3)
        params["groups"].append(
            {
                "table": jax.random.normal(k1, (n, dim)),
                "kernel": jax.random.normal(k2, (dim, chunk)) / math.sqrt(dim),
                "bias": jnp.zeros((chunk,)),
            }
        )
        s2 = sum(p.size * (p.init_std**2 if p.init_std > 0 else zero_var) for p in tensors) / size
        mults.append(
            tuple(
                boost * m
                for m in (
                    math.sqrt(dim / chunk) / s2,
                    1 / (s2 * math.sqrt(n * dim)),
                    1 / (s2 * math.sqrt(n)),
                )
            )
        )

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        raws: list[Any] = [None] * len(GEN.GENERATED)
        for group, g, (mt, mw, mb) in zip(groups, p["groups"], mults, strict=True):
            table = GEN.scale_grad(g["table"], mt)
            raw = GEN.scaled_dense(table, g["kernel"], g["bias"], mw, mb).reshape(-1)
            off = 0
            for i in group:
                size = GEN.GENERATED[i].size
                raws[i] = unit_rms(raw[off : off + size]) if norm else raw[off : off + size]
                off += size
        flat_raw = GEN.concat_flat(raws, [t.offset for t in GEN.GENERATED], GEN.FLAT_SIZE)
        flat = GEN.decode(
            flat_raw, p["scale"], p["shift"], GEN.GENERATED, GEN.FLAT_SIZE, GEN.GRADIENT_SCALE
        )
        logits = target.apply({"params": GEN.unflatten_params(flat)}, x)
        return xent(logits, y)

    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params["groups"]))
    return loss_fn, params, count


def aligned(spec: str, seed: int) -> tuple[Any, Any, int]:
    """hypernn_gen.design's grouped generator on the file's own tensor-aligned chunks, through
    the Flax kernel (``grouped_linear``, ``normalized``, ``decode``)."""
    from types import SimpleNamespace

    from hypernn_gen import design
    from hypernn_gen.kernel import flax as fk
    from hypernn_gen.layout import Chunking

    _, *rest = spec.split(":")
    boost = float(rest[0]) if rest else 1.0
    norm = len(rest) < 2  # a second field (``raw``): no normalisation
    layout = SimpleNamespace(generated=GEN.GENERATED)
    chunking = Chunking(GEN.NUM_EMBEDDINGS, GEN.CHUNK_DIM)
    rows = design.group_rows(layout, chunking)
    mults = [
        tuple(boost * m for m in ms)
        for ms in design.group_gradient_multipliers(layout, chunking, GEN.EMBEDDING_DIM)
    ]
    n, c, d = GEN.NUM_EMBEDDINGS, GEN.CHUNK_DIM, GEN.EMBEDDING_DIM
    keys = jax.random.split(jax.random.key(seed), len(rows) + 1)
    params = {
        "scale": jnp.asarray([p.init_std for p in GEN.GENERATED], jnp.float32),
        "shift": jnp.asarray([p.init_mean for p in GEN.GENERATED], jnp.float32),
        "table": jax.random.normal(keys[0], (n, d)),
        "kernel": jnp.stack([jax.random.normal(k, (d, c)) / math.sqrt(d) for k in keys[1:]]),
        "bias": jnp.zeros((len(rows), c)),
    }
    factors = fk.row_factors(rows, mults)
    target = GEN.make_target()

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        table = fk.scale_grad(p["table"], factors)
        raw = fk.grouped_linear(table, p["kernel"], p["bias"], rows, mults)
        raw = raw.reshape(-1)[: GEN.FLAT_SIZE]
        if norm:
            raw = fk.normalized(raw, GEN.GENERATED, GEN.FLAT_SIZE)
        flat = fk.decode(
            raw, p["scale"], p["shift"], GEN.GENERATED, GEN.FLAT_SIZE, GEN.GRADIENT_SCALE
        )
        return xent(target.apply({"params": GEN.unflatten_params(flat)}, x), y)

    count = n * d + len(rows) * (d * c + c)
    return loss_fn, params, count


def build(variant: str, seed: int) -> tuple[Any, Any, int]:
    x0 = jnp.zeros((BATCH, 16), jnp.int32)
    if variant == "plain":
        model = GEN.make_target()
        params = model.init(jax.random.key(seed), x0)["params"]
        return (lambda p, x, y: xent(model.apply({"params": p}, x), y)), params, 0
    if variant == "shared":
        model = GEN.LinenTransformerHyperNetwork()
        variables = model.init(jax.random.key(seed), x0)
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
            return xent(model.apply({"params": p, **rest}, x)[0], y)

        count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
        return loss_fn, params, count
    if variant.startswith("aligned"):
        return aligned(variant, seed)
    return grouped(variant, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=["shared", "grouped:2:124:32:1e-2:0.35"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    args = parser.parse_args()
    for name in args.optimizers:
        for seed in args.seeds:
            losses = {}
            for variant in ["plain", *args.variants]:
                loss_fn, params, _ = build(variant, seed)
                losses[variant] = train(loss_fn, params, name)
            ratios = " ".join(
                f"{v}={loss:.3f} ({loss / losses['plain']:.2f}x)" for v, loss in losses.items()
            )
            print(f"{name} seed {seed}: {ratios}", flush=True)
    for variant in args.variants:
        print(f"{variant}: {build(variant, 0)[2]:,} hypernetwork parameters")


if __name__ == "__main__":
    main()
