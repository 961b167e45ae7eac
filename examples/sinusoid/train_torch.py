"""Sinusoid regression with a generated dynamic hypernetwork: one weight set per task (PyTorch).

    python examples/sinusoid/train_torch.py            # full run (a few minutes on one core)
    python examples/sinusoid/train_torch.py --quick    # a few steps, no MSE check (CI)

A task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]`` and
``x ~ U[-5, 5]`` (the tasks of MAML's sinusoid experiment). The model sees a task only through
its values at ``GRID_POINTS`` = 10 fixed x positions (the *condition*) and must predict ``y`` at
any other ``x``.

* **dynamic hypernetwork** (``sine_torch_dynamic.py``, generated from ``target.py``): the
  condition goes in as ``condition=`` and selects the weights of the 1-40-40-1 target MLP for that
  task; the query points go through the target with those weights.
* **static MLP**: one weight set for every task, input ``x`` (what a static network trained on
  the same tasks can do: it learns the average task).
* **MLP on [x, condition]**: one weight set, but the condition is appended to every query point;
  the usual way to give a plain network the task, shown for context.

The baselines get about as many trainable parameters as the hypernetwork. The full run asserts
that the dynamic hypernetwork's test MSE is under a fifth of the static MLP's and saves
``predictions_torch.png`` (four test tasks and the test-MSE curves).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sine_torch_dynamic import SineMLPHyperNetwork  # noqa: E402 (generated file, next to us)
from target import GRID_POINTS  # noqa: E402

GRID = torch.linspace(-5.0, 5.0, GRID_POINTS).view(1, GRID_POINTS, 1)


class Tasks:
    """A batch of sinusoid tasks: the condition (values on GRID) and query points."""

    def __init__(self, n: int, points: int, generator: torch.Generator) -> None:
        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return torch.empty(*shape).uniform_(low, high, generator=generator)

        self.amplitude = uniform(0.1, 5.0, n, 1, 1)
        self.phase = uniform(0.0, math.pi, n, 1, 1)
        self.condition = self(GRID)  # (n, GRID_POINTS, 1)
        self.x = uniform(-5.0, 5.0, n, points, 1)
        self.y = self(self.x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.amplitude * torch.sin(x - self.phase)


Model = Callable[[Tensor, Tensor], Tensor]  # (condition, x) -> y


def mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def matched_mlp(inputs: int, budget: int) -> nn.Sequential:
    """The two-hidden-layer MLP whose parameter count is closest to ``budget``."""
    hidden = min(range(1, 512), key=lambda h: abs(h * h + (inputs + 3) * h + 1 - budget))
    return mlp(inputs, hidden)


def build(seed: int) -> dict[str, tuple[nn.Module, Model]]:
    torch.manual_seed(seed)
    hyper = SineMLPHyperNetwork()
    budget = count(hyper)
    static = matched_mlp(1, budget)
    concat = matched_mlp(1 + GRID_POINTS, budget)

    def with_condition(c: Tensor, x: Tensor) -> Tensor:
        flat = c.flatten(1)[:, None, :].expand(-1, x.shape[1], -1)
        return concat(torch.cat([x, flat], -1))

    return {
        # fused dynamic path: per-task outputs without building per-task weight tensors
        "dynamic hypernetwork": (hyper, lambda c, x: hyper(x, condition=c)[0]),
        "static MLP": (static, lambda c, x: static(x)),
        "MLP on [x, condition]": (concat, with_condition),
    }


def mse(model: Model, tasks: Tasks) -> float:
    with torch.no_grad():
        return torch.mean((model(tasks.condition, tasks.x) - tasks.y) ** 2).item()


def train(
    name: str,
    module: nn.Module,
    model: Model,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    valid: Tasks,
    every: int,
) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(seed)  # the same task stream for every model
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    history: dict[str, list[float]] = {"step": [], "valid_mse": []}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        tasks = Tasks(batch, 20, generator)
        loss = torch.mean((model(tasks.condition, tasks.x) - tasks.y) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            history["step"].append(step)
            history["valid_mse"].append(mse(model, valid))
            if step % (every * 4) == 0 or step == steps:
                print(
                    f"[{name}] step {step:5d}  train MSE {loss.item():.4f}  "
                    f"valid MSE {history['valid_mse'][-1]:.4f}  "
                    f"({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
    return history


def plot(
    models: dict[str, tuple[nn.Module, Model]],
    histories: dict[str, dict[str, list[float]]],
    results: dict[str, float],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = Tasks(4, 1, torch.Generator().manual_seed(7))
    dense = torch.linspace(-5.0, 5.0, 200).view(1, -1, 1).expand(4, -1, -1)
    colors = {
        "dynamic hypernetwork": "tab:red",
        "static MLP": "tab:blue",
        "MLP on [x, condition]": "tab:green",
    }
    fig = plt.figure(figsize=(15, 7))
    grid = fig.add_gridspec(2, 4, height_ratios=(1, 0.9))
    for i in range(4):
        ax = fig.add_subplot(grid[0, i])
        ax.plot(dense[i, :, 0], shown(dense)[i, :, 0], color="black", linewidth=2, label="task")
        ax.scatter(
            GRID[0, :, 0],
            shown.condition[i, :, 0],
            color="black",
            zorder=3,
            s=18,
            label="condition (10 values)",
        )
        for name, (module, model) in models.items():
            module.eval()
            with torch.no_grad():
                prediction = model(shown.condition, dense)
            ax.plot(dense[i, :, 0], prediction[i, :, 0], color=colors[name], label=name)
        a, p = shown.amplitude[i].item(), shown.phase[i].item()
        ax.set(title=f"A = {a:.2f}, phase = {p:.2f}", xlabel="x", ylim=(-5.5, 5.5))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
    ax = fig.add_subplot(grid[1, :])
    for name, h in histories.items():
        ax.plot(
            h["step"],
            h["valid_mse"],
            color=colors[name],
            label=f"{name} ({count(models[name][0]):,} parameters): test MSE {results[name]:.4f}",
        )
    ax.set(xlabel="training step (32 tasks each)", ylabel="validation MSE", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("sinusoid tasks: per-task weights from a generated dynamic hypernetwork")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, no MSE check")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-tasks", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to save predictions_torch.png (default: next to this "
        "file; --quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 20 if args.quick else args.steps

    models = build(args.seed)
    valid = Tasks(200, 50, torch.Generator().manual_seed(10_000 + args.seed))
    test = Tasks(1000, 50, torch.Generator().manual_seed(20_000 + args.seed))
    for name, (module, _) in models.items():
        print(f"{name}: {count(module):,} trainable parameters")
    histories, results = {}, {}
    for name, (module, model) in models.items():
        histories[name] = train(
            name,
            module,
            model,
            steps=steps,
            batch=args.batch_tasks,
            lr=args.lr,
            seed=args.seed,
            valid=valid,
            every=max(1, min(100, steps // 10)),
        )
        module.eval()
        results[name] = mse(model, test)
    print(f"test tasks: {len(test.x)} x {test.x.shape[1]} query points")
    for name, value in results.items():
        print(f"test MSE ({name}): {value:.4f}")
    ratio = results["static MLP"] / results["dynamic hypernetwork"]
    print(f"static MLP MSE / dynamic hypernetwork MSE: {ratio:.1f}x")

    path = out_dir / "predictions_torch.png"
    plot(models, histories, results, path)
    print(f"saved {path}")
    if not args.quick and ratio < 5:
        print("FAILED: the dynamic hypernetwork should beat the static MLP by 5x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
