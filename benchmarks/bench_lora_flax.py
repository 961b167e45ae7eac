"""Dynamic LoRA for Flax NNX: forward+backward time and XLA's temporary memory at batch 64.

Three ways to run a batch of B sequences through a frozen MLP-block model with one LoRA adapter
set per sample (the Flax counterpart of ``bench_lora.py``):

* ``base``: the model alone, its weights trainable (full fine-tuning's step, the floor);
* ``lora``: ``NNXLoRAHyperNetwork(..., mode="dynamic")``: ``y_b = W x_b + s B_b (A_b x_b)`` with
  batched einsums, no per-sample W;
* ``merged``: the same adapters materialised as per-sample merged kernels ``W + s (B_b A_b)^T``
  and the model run per sample with ``jax.vmap`` over them (the naive way).

Each step is ``jax.jit``-compiled; times are medians of interleaved repetitions (one step of
each candidate per round); memory is the compiled step's ``temp_size_in_bytes`` (XLA's buffer
assignment, the same on every run). ``lora`` and ``merged`` are checked to agree.

    python benchmarks/bench_lora_flax.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}"
        )
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hypernn_gen.runtime.flax.lora import NNXLoRAHyperNetwork

    d, blocks = args.d_model, args.blocks

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return x + self.down(jax.nn.gelu(self.up(x)))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.layers = nnx.List([Block(rngs) for _ in range(blocks)])

        def __call__(self, x: jax.Array) -> jax.Array:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Model(nnx.Rngs(0))
    hyper = NNXLoRAHyperNetwork(
        model, 32, mode="dynamic", condition_shape=(16,), lora_rank=args.rank, rngs=nnx.Rngs(1)
    )
    heads = nnx.state(hyper.generator.heads_b)  # nonzero B, so that both paths do real work
    nnx.update(hyper.generator.heads_b, jax.tree.map(lambda v: v + 0.01, heads))
    x = jax.random.normal(jax.random.key(2), (args.batch, args.tokens, d))
    c = jax.random.normal(jax.random.key(3), (args.batch, 16))
    scaling = hyper.scaling

    g_def, g_state = nnx.split(hyper)
    m_def, m_state = nnx.split(model)

    def lora_loss(state):  # noqa: ANN001, ANN202
        return jnp.square(nnx.merge(g_def, state)(x, condition=c)[0]).mean()

    def base_loss(state):  # noqa: ANN001, ANN202
        return jnp.square(nnx.merge(m_def, state)(x)).mean()

    def merged_loss(state):  # noqa: ANN001, ANN202
        adapters = nnx.merge(g_def, state).generate_adapters(c)
        flat = dict(nnx.to_flat_state(m_state))

        def one(index: jax.Array, xb: jax.Array) -> jax.Array:
            own = dict(flat)
            for a in hyper.adapters:
                key = (*a.keys, "kernel")
                b_a = adapters[f"{a.path}.lora_B"][index] @ adapters[f"{a.path}.lora_A"][index]
                own[key] = own[key].replace(own[key].get_value() + scaling * b_a.T)
            return nnx.merge(m_def, nnx.from_flat_state(list(own.items())))(xb[None])[0]

        out = jax.vmap(one)(jnp.arange(args.batch), x)
        return jnp.square(out).mean()

    steps = {
        "base": (jax.jit(jax.value_and_grad(base_loss)), m_state),
        "lora": (jax.jit(jax.value_and_grad(lora_loss)), g_state),
        "merged": (jax.jit(jax.value_and_grad(merged_loss)), g_state),
    }
    memory = {
        k: f.lower(s).compile().memory_analysis().temp_size_in_bytes for k, (f, s) in steps.items()
    }
    values = {k: float(f(s)[0]) for k, (f, s) in steps.items()}  # compile and warm up
    np.testing.assert_allclose(values["lora"], values["merged"], rtol=1e-4)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, (f, s) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(f(s))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["base"])
    print(
        f"NNX dynamic LoRA, batch {args.batch} x {args.tokens} tokens, d {d}, {blocks} blocks, "
        f"rank {args.rank}, {args.threads} thread(s), jax {jax.__version__}"
    )
    print("| candidate | forward+backward (ms) | vs base | XLA temp memory (MiB) |")
    print("|---|---|---|---|")
    for name in steps:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x | {memory[name] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
