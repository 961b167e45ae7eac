"""Learning-rate sweep (issue 16): final loss against learning rate, SGD and Adam.

The seed MLP (8-256-256-4, tanh) on a 512-point regression (``y = sin(x A) + noise``), batches
of 32, the same batches for every model, trained as the plain target, through the generated
static and dynamic hypernetworks (generated_examples/seed_mlp_torch_*.py, default options:
gradient scaling on), the runtime static one with ``gradient_scaling="off"`` (the raw
gradients), and hyper-nn 0.2.2's static ``TorchLinearHyperNetwork`` (skipped when it is not
installed: ``pip install --no-deps hyper-nn==0.2.2``). Prints a Markdown table of the final
full-data MSE (``nan``: diverged) and writes benchmarks/training_lr_sweep.png.

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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(11, 4), sharey=True)
    for ax, optimizer in zip(axes, OPTIMIZERS, strict=True):
        finite = [v for losses in results[optimizer].values() for v in losses if math.isfinite(v)]
        top = 3 * max(finite, default=1.0)  # diverged runs: an x in the line's colour up here
        for name, losses in results[optimizer].items():
            (line,) = ax.plot(LRS, losses, marker="o", label=name)
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
