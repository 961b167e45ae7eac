"""Train a generated static hypernetwork on scikit-learn's handwritten digits (PyTorch).

    python examples/digits/train_torch.py            # full run (about a minute on one core)
    python examples/digits/train_torch.py --quick    # a few steps, no accuracy check (CI)

The target is ``DigitsCNN`` (``target.py``, 38,282 parameters). ``digits_torch_static.py`` was
generated from it by ``hypernn-gen`` (the ``[[tool.hypernn-gen.jobs]]`` entry in pyproject.toml,
``--embedding-dim 16``): a 196 x 16 embedding table and a 16 -> 196 linear weight generator
make all 38,282 weights, so only 6,484 numbers are trained. For comparison the plain target is
trained the same way. The full run asserts >= 95 % test accuracy and saves the loss and accuracy
curves to ``curves_torch.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digits_torch_static import DigitsCNNHyperNetwork  # noqa: E402 (generated file, next to us)
from plotting import plot_curves  # noqa: E402
from target import DigitsCNN  # noqa: E402

TARGET_ACCURACY = 0.95  # the full run fails below this


def load_data() -> tuple[torch.Tensor, ...]:
    """1,797 8x8 images with values 0..16, scaled to [0, 1]; a fixed, stratified 75/25 split."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target)
    return tuple(train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels))


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def train(
    model: nn.Module,
    forward,  # (model, x) -> logits
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int,
    steps: int | None,
    lr: float,
    batch_size: int,
    seed: int,
    name: str,
) -> dict[str, list[float]]:
    """Adam with a cosine learning-rate decay; per-epoch train loss, test loss and accuracy."""
    x_train, x_test, y_train, y_test = data
    torch.manual_seed(seed)
    per_epoch = -(-len(x_train) // batch_size)
    total = steps if steps is not None else epochs * per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    history: dict[str, list[float]] = {
        "step": [],
        "train_loss": [],
        "test_loss": [],
        "test_acc": [],
    }
    step, start = 0, time.perf_counter()
    while step < total:
        model.train()
        losses = []
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch_size):
            batch = order[i : i + batch_size]
            loss = F.cross_entropy(forward(model, x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step == total:
                break
        model.eval()
        with torch.no_grad():
            logits = forward(model, x_test)
            test_loss = F.cross_entropy(logits, y_test).item()
            accuracy = (logits.argmax(1) == y_test).float().mean().item()
        for key, value in zip(
            history, (step, float(np.mean(losses)), test_loss, accuracy), strict=True
        ):
            history[key].append(value)
        epoch = len(history["step"])
        if epoch % 10 == 0 or step == total:
            print(
                f"[{name}] epoch {epoch:3d} step {step:5d}  train loss {history['train_loss'][-1]:.4f}"
                f"  test loss {test_loss:.4f}  test accuracy {accuracy:.2%}"
                f"  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, no accuracy check")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to save curves_torch.png (default: next to this file; "
        "--quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the models are tiny: more threads mostly add overhead
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_data()
    torch.manual_seed(args.seed)
    hypernetwork = DigitsCNNHyperNetwork()
    plain = DigitsCNN()
    n_hyper, n_target = count_trainable(hypernetwork), count_trainable(plain)
    ratio = n_target / n_hyper
    print(f"train/test images: {len(data[0])}/{len(data[1])}")
    print(f"target parameters: {n_target:,}")
    print(f"hypernetwork trainable parameters: {n_hyper:,}")
    print(f"compression ratio: {ratio:.2f}x (target parameters / hypernetwork parameters)")
    assert ratio > 1, "the hypernetwork should be smaller than its target"

    options = dict(
        epochs=args.epochs,
        steps=5 if args.quick else None,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    histories = {
        "hypernetwork": train(
            hypernetwork, lambda m, x: m(x)[0], data, name="hypernetwork", **options
        ),
        "plain target": train(plain, lambda m, x: m(x), data, name="plain target", **options),
    }
    accuracy = histories["hypernetwork"]["test_acc"][-1]
    plain_accuracy = histories["plain target"]["test_acc"][-1]
    print(f"test accuracy (hypernetwork, {n_hyper:,} parameters): {accuracy:.2%}")
    print(f"test accuracy (plain target, {n_target:,} parameters): {plain_accuracy:.2%}")

    path = out_dir / "curves_torch.png"
    plot_curves(
        histories,
        path,
        f"digits: generated static hypernetwork ({n_hyper:,} trained parameters, "
        f"{ratio:.1f}x fewer than the target's {n_target:,})",
        target_accuracy=TARGET_ACCURACY,
    )
    print(f"saved {path}")
    if not args.quick and accuracy < TARGET_ACCURACY:
        print(f"FAILED: test accuracy {accuracy:.2%} < {TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
