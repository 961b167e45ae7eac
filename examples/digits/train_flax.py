"""Train a generated static hypernetwork on scikit-learn's handwritten digits (JAX/Flax).

    python examples/digits/train_flax.py                # full run, Flax NNX
    python examples/digits/train_flax.py --api linen    # full run, Flax Linen
    python examples/digits/train_flax.py --quick        # a few steps, no accuracy check (CI)

The target is ``target.py``'s CNN written in Flax: ``target_nnx.py`` (NNX) and
``target_linen.py`` (Linen), 38,282 parameters each. ``digits_nnx_static.py`` and
``digits_linen_static.py`` were generated from them by ``hypernn-gen`` (the
``[[tool.hypernn-gen.jobs]]`` entries in pyproject.toml, ``--embedding-dim 16``), with the sizes
of the PyTorch example's file: a 196 x 16 embedding table and a 16 -> 196 linear weight generator
make all 38,282 weights, so only 6,484 numbers are trained. For comparison the plain target is
trained the same way. Either API becomes a pure ``forward(params, images)`` function, and one
jitted optax Adam step trains it. The full run asserts >= 95 % test accuracy and saves the loss
and accuracy curves to ``curves_flax.png`` (``curves_flax_linen.png`` with ``--api linen``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import digits_linen_static  # noqa: E402 (generated files, next to us)
import digits_nnx_static  # noqa: E402
from plotting import plot_curves  # noqa: E402

TARGET_ACCURACY = 0.95  # the full run fails below this
QUICK_STEPS = 66  # --quick: three epochs of batches of 64

Forward = Callable[[Any, jax.Array], jax.Array]  # (params, images) -> logits


def load_data() -> tuple[np.ndarray, ...]:
    """1,797 8x8 images with values 0..16, scaled to [0, 1], NHWC; the split of train_torch.py."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return tuple(
        train_test_split(
            images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
        )
    )


def count(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def nnx_models(seed: int) -> dict[str, tuple[Forward, Any]]:
    """The NNX hypernetwork and plain target as ``(forward, params)``.

    ``nnx.split`` separates each module's trainable ``nnx.Param`` state from the rest (for the
    hypernetwork, the target copy's empty generated slots); ``nnx.merge`` rebuilds the module
    inside ``forward``, so jax.jit and jax.grad see plain arrays.
    """
    gen = digits_nnx_static
    hypernetwork = gen.DigitsCNNHyperNetwork(rngs=nnx.Rngs(seed))
    plain = gen.DigitsCNN(rngs=nnx.Rngs(seed))
    hyper_def, hyper_params, hyper_rest = nnx.split(hypernetwork, nnx.Param, ...)
    plain_def, plain_params, plain_rest = nnx.split(plain, nnx.Param, ...)
    return {
        "hypernetwork": (
            lambda p, x: nnx.merge(hyper_def, p, hyper_rest)(x)[0],  # (output, generated)
            hyper_params,
        ),
        "plain target": (lambda p, x: nnx.merge(plain_def, p, plain_rest)(x), plain_params),
    }


def linen_models(seed: int, example: jax.Array) -> dict[str, tuple[Forward, Any]]:
    """The Linen hypernetwork and plain target as ``(forward, params)``."""
    gen = digits_linen_static
    hypernetwork, plain = gen.DigitsCNNHyperNetwork(), gen.DigitsCNN()
    key = jax.random.key(seed)
    return {
        "hypernetwork": (
            lambda p, x: hypernetwork.apply({"params": p}, x)[0],
            hypernetwork.init(key, example)["params"],
        ),
        "plain target": (
            lambda p, x: plain.apply({"params": p}, x),
            plain.init(key, example)["params"],
        ),
    }


def train(
    forward: Forward,
    params: Any,
    data: tuple[np.ndarray, ...],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    name: str,
) -> dict[str, list[float]]:
    """Adam with a cosine learning-rate decay; per-epoch train loss, test loss and accuracy."""
    x_train, x_test, y_train, y_test = data
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(params)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

    @jax.jit
    def train_step(p: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    @jax.jit
    def evaluate(p: Any) -> tuple[jax.Array, jax.Array]:
        logits = forward(p, x_test)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
        return loss, (logits.argmax(-1) == y_test).mean()

    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {
        "step": [],
        "train_loss": [],
        "test_loss": [],
        "test_acc": [],
        "step_loss": [],  # every step's batch loss
    }
    step, start = 0, time.perf_counter()
    while step < steps:
        order, losses = rng.permutation(len(x_train)), []
        for i in range(0, len(x_train), batch_size):
            batch = order[i : i + batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[batch], y_train[batch])
            losses.append(float(loss))
            step += 1
            if step == steps:
                break
        history["step_loss"] += losses
        test_loss, accuracy = (float(v) for v in evaluate(params))
        for key, value in zip(
            ("step", "train_loss", "test_loss", "test_acc"),
            (step, float(np.mean(losses)), test_loss, accuracy),
            strict=True,
        ):
            history[key].append(value)
        epoch = len(history["step"])
        if epoch % 10 == 0 or step == steps:
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
    parser.add_argument(
        "--api",
        choices=("nnx", "linen"),
        default="nnx",
        help="train digits_nnx_static.py (default) or digits_linen_static.py",
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to save the figure (default: next to this file; --quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_data()
    steps = QUICK_STEPS if args.quick else args.epochs * -(-len(data[0]) // args.batch_size)
    if args.api == "nnx":
        models = nnx_models(args.seed)
    else:
        models = linen_models(args.seed, jnp.asarray(data[0][:2]))
    n_hyper, n_target = (count(models[k][1]) for k in ("hypernetwork", "plain target"))
    ratio = n_target / n_hyper
    generated = f"digits_{args.api}_static.py"
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"hypernetwork: DigitsCNNHyperNetwork from {generated} (generated, Flax {args.api})")
    print(f"train/test images: {len(data[0])}/{len(data[1])}")
    print(f"target parameters: {n_target:,}")
    print(f"hypernetwork trainable parameters: {n_hyper:,}")
    print(f"compression ratio: {ratio:.2f}x (target parameters / hypernetwork parameters)")
    assert ratio > 1, "the hypernetwork should be smaller than its target"

    options = dict(steps=steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    histories = {
        name: train(forward, params, data, name=name, **options)
        for name, (forward, params) in models.items()
    }
    hyper = histories["hypernetwork"]
    # The first and last few batch losses: --quick's evidence that training works (tests check it).
    first, last = np.mean(hyper["step_loss"][:5]), np.mean(hyper["step_loss"][-5:])
    print(f"hypernetwork train loss: {first:.4f} (first 5 steps) -> {last:.4f} (last 5 steps)")
    accuracy = hyper["test_acc"][-1]
    plain_accuracy = histories["plain target"]["test_acc"][-1]
    print(f"test accuracy (hypernetwork, {n_hyper:,} parameters): {accuracy:.2%}")
    print(f"test accuracy (plain target, {n_target:,} parameters): {plain_accuracy:.2%}")

    path = out_dir / ("curves_flax.png" if args.api == "nnx" else "curves_flax_linen.png")
    plot_curves(
        histories,
        path,
        f"digits (Flax {args.api}): generated static hypernetwork ({n_hyper:,} trained "
        f"parameters, {ratio:.1f}x fewer than the target's {n_target:,})",
        target_accuracy=TARGET_ACCURACY,
    )
    print(f"saved {path}")
    if not args.quick and accuracy < TARGET_ACCURACY:
        print(f"FAILED: test accuracy {accuracy:.2%} < {TARGET_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
