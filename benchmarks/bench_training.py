"""Learning-rate sweep (issue 16): final loss against learning rate, SGD and Adam.

The seed MLP (8-256-256-4, tanh) on a 512-point regression (``y = sin(x A) + noise``), batches
of 32, the same batches for every model, trained as the plain target, through the generated
static and dynamic hypernetworks (generated_examples/seed_mlp_torch_*.py, default options:
gradient scaling on), the runtime static one with ``gradient_scaling="off"`` (the raw
gradients), and hyper-nn 0.2.2's static ``TorchLinearHyperNetwork`` (skipped when it is not
installed: ``pip install --no-deps hyper-nn==0.2.2``). Then Flax (``--flax``, default on): the
8-64-64-4 tanh MLP of generated_examples/targets/{linen,nnx}_mlp.py, plain and through the
committed generated static and dynamic files, with optax's SGD and Adam on the same data and
batches (one compiled scan per run). Prints a Markdown table of the final full-data MSE
(``nan``: diverged) and writes benchmarks/training_lr_sweep.png.

    python benchmarks/bench_training.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
OPTIMIZERS: dict[str, Callable] = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
}


def load(path: Path):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 4, generator=g)) + 0.1 * torch.randn(512, 4, generator=g)
    return x, y


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def final_loss(model: nn.Module, optimizer: str, lr: float, steps: int) -> float:
    x, y = data()
    opt = OPTIMIZERS[optimizer](model.parameters(), lr)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 512, (32,), generator=g)
        loss = (output(model, x[idx]) - y[idx]).square().mean()
        if not torch.isfinite(loss):
            return math.nan
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        value = float((output(model, x) - y).square().mean())
    return value if math.isfinite(value) else math.nan


def models() -> dict[str, Callable[[], nn.Module] | str]:
    static = load(ROOT / "generated_examples" / "seed_mlp_torch_static.py")
    dynamic = load(ROOT / "generated_examples" / "seed_mlp_torch_dynamic.py")
    from hypernn_gen.runtime.torch import TorchHyperNetwork

    found: dict[str, Callable[[], nn.Module] | str] = {
        "target": static.make_target,
        "ours static": lambda: static.SeedMlpHyperNetwork(),
        "ours dynamic": lambda: dynamic.SeedMlpHyperNetwork(),
        "ours static, scaling off": lambda: TorchHyperNetwork(
            static.make_target(), gradient_scaling="off"
        ),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from hypernn.torch.linear_hypernet import TorchLinearHyperNetwork

        def hyper_nn() -> nn.Module:
            return TorchLinearHyperNetwork.from_target(
                static.make_target(), embedding_dim=32, num_embeddings=static.NUM_EMBEDDINGS
            )

        found["hyper-nn 0.2.2 static"] = hyper_nn
    except Exception as error:  # noqa: BLE001 - reported in the table
        found["hyper-nn 0.2.2 static"] = f"not run ({type(error).__name__}: {error})"
    return found


def flax_models() -> dict[str, tuple[Callable, Any]]:
    """name -> (loss_fn(params, x, y), initial params) of the plain Flax targets and ours."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def mse(out: Any, y: Any) -> Any:
        return jnp.mean(((out[0] if isinstance(out, tuple) else out) - y) ** 2)

    found: dict[str, tuple[Callable, Any]] = {}
    for framework in ("linen", "nnx"):
        files = {
            m: load(ROOT / "generated_examples" / f"{framework}_mlp_{framework}_{m}.py")
            for m in ("static", "dynamic")
        }
        for name, mode in (
            ("target", None),
            ("ours static", "static"),
            ("ours dynamic", "dynamic"),
        ):
            module = files[mode or "static"]
            cls = next(v for k, v in vars(module).items() if k.endswith("HyperNetwork"))
            if framework == "linen":
                model = module.MLP() if mode is None else cls()
                params = model.init(jax.random.key(1), jnp.zeros((32, 8)))["params"]

                def loss(p: Any, x: Any, y: Any, model: Any = model) -> Any:
                    return mse(model.apply({"params": p}, x), y)
            else:
                target = module.MLP(rngs=nnx.Rngs(1))
                model = target if mode is None else cls(target, rngs=nnx.Rngs(1))
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)

                def loss(p: Any, x: Any, y: Any, g: Any = graphdef, r: Any = rest) -> Any:
                    return mse(nnx.merge(g, p, r)(x), y)

            found[f"{'Linen' if framework == 'linen' else 'NNX'} {name}"] = (loss, params)
    return found


def flax_final_loss(loss_fn: Callable, params: Any, optimizer: str, lr: float, steps: int) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    x, y = (jnp.asarray(a.numpy()) for a in data())
    g = torch.Generator().manual_seed(2)
    idx = jnp.asarray(
        torch.stack([torch.randint(0, 512, (32,), generator=g) for _ in range(steps)]).numpy()
    )
    tx = optax.sgd(lr) if optimizer == "SGD" else optax.adam(lr)

    @jax.jit
    def run(params: Any) -> Any:
        def step(carry: tuple, batch: Any) -> tuple:
            p, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(p, x[batch], y[batch]), state, p)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), idx)
        return loss_fn(params, x, y)

    value = float(run(params))
    return value if math.isfinite(value) else math.nan


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(11, 4), sharey=True)
    for ax, optimizer in zip(axes, OPTIMIZERS, strict=True):
        finite = [v for losses in results[optimizer].values() for v in losses if math.isfinite(v)]
        top = 3 * max(finite, default=1.0)  # diverged runs: an x in the line's colour up here
        for name, losses in results[optimizer].items():
            style = "--" if name.startswith(("Linen", "NNX")) else "-"
            (line,) = ax.plot(LRS, losses, style, marker="o", label=name)
            nan = [lr for lr, v in zip(LRS, losses, strict=True) if not math.isfinite(v)]
            ax.plot(nan, [top] * len(nan), "x", color=line.get_color(), markersize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{optimizer}: final MSE (x at the top: diverged)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("final MSE, all 512 points")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "training_lr_sweep.png"))
    parser.add_argument("--flax", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = models()
    results: dict[str, dict[str, list[float]]] = {o: {} for o in OPTIMIZERS}
    for optimizer in OPTIMIZERS:
        for name, make in found.items():
            if isinstance(make, str):
                continue
            losses = []
            for lr in LRS:
                torch.manual_seed(1)
                losses.append(final_loss(make(), optimizer, lr, args.steps))
                print(f"{optimizer} {name} lr {lr:g}: {losses[-1]:.4g}", file=sys.stderr)
            results[optimizer][name] = losses
    if args.flax:
        for name, (loss_fn, params) in flax_models().items():
            for optimizer in OPTIMIZERS:
                losses = [flax_final_loss(loss_fn, params, optimizer, lr, args.steps) for lr in LRS]
                print(f"{optimizer} {name}: {losses}", file=sys.stderr)
                results[optimizer][name] = losses
    print(f"final MSE after {args.steps} steps (batch 32, 512 points; nan: diverged)\n")
    print("| optimizer | model | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |")
    print("| --- | --- |" + " --- |" * len(LRS))
    for optimizer, rows in results.items():
        for name, losses in rows.items():
            cells = " | ".join("nan" if not math.isfinite(v) else f"{v:.3g}" for v in losses)
            print(f"| {optimizer} | {name} | {cells} |")
    for name, make in found.items():
        if isinstance(make, str):
            print(f"\n{name}: {make}")
    plot(results, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
