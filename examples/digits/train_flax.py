"""The digits example in JAX/Flax: the runtime ``FlaxHyperNetwork`` around a Linen CNN.

    python examples/digits/train_flax.py            # full run
    python examples/digits/train_flax.py --quick    # a few steps, no accuracy check (CI)

``DigitsCNN`` below is ``target.py``'s network in Linen (NHWC images, the same 38,282
parameters). It is wrapped by the runtime library's ``hypernn_gen.runtime.flax.FlaxHyperNetwork``
with ``embedding_dim=16``, the sizes of the PyTorch example's generated file, and trained with
optax's Adam. (This uses the runtime class, not a generated Linen file.) The full run asserts
>= 95 % test accuracy and saves ``curves_flax.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from hypernn_gen.runtime.flax import FlaxHyperNetwork  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from plotting import plot_curves  # noqa: E402 (next to this file)

TARGET_ACCURACY = 0.95  # the full run fails below this


class DigitsCNN(nn.Module):
    """``target.py``'s CNN in Linen: (batch, 8, 8, 1) -> (batch, 10)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3), padding=1)(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding=1)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def load_data() -> tuple[np.ndarray, ...]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC
    return tuple(
        train_test_split(
            images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
        )
    )


def count(tree) -> int:  # noqa: ANN001
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def train(model, params, data, *, steps: int, lr: float, batch_size: int, seed: int, name: str):  # noqa: ANN001, ANN201
    x_train, x_test, y_train, y_test = data
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(params)

    def loss_fn(p, x, y):  # noqa: ANN001, ANN202
        logits = model(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step_fn(p, state, x, y):  # noqa: ANN001, ANN202
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    @jax.jit
    def evaluate(p):  # noqa: ANN001, ANN202
        logits = model(p, x_test)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
        return loss, (logits.argmax(-1) == y_test).mean()

    rng = np.random.default_rng(seed)
    history = {"step": [], "train_loss": [], "test_loss": [], "test_acc": []}
    step, start = 0, time.perf_counter()
    while step < steps:
        order, losses = rng.permutation(len(x_train)), []
        for i in range(0, len(x_train), batch_size):
            batch = order[i : i + batch_size]
            params, opt_state, loss = step_fn(params, opt_state, x_train[batch], y_train[batch])
            losses.append(float(loss))
            step += 1
            if step == steps:
                break
        test_loss, accuracy = (float(v) for v in evaluate(params))
        for key, value in zip(
            history, (step, float(np.mean(losses)), test_loss, accuracy), strict=True
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
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to save curves_flax.png (default: next to this file; "
        "--quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.quick else HERE)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_data()
    steps = 5 if args.quick else args.epochs * -(-len(data[0]) // args.batch_size)
    key = jax.random.key(args.seed)
    target = DigitsCNN()
    hypernetwork = FlaxHyperNetwork(target, embedding_dim=16)
    example = jnp.asarray(data[0][:2])
    hyper_params = hypernetwork.init(key, example)["params"]
    plain_params = target.init(key, example)["params"]
    n_hyper, n_target = count(hyper_params), count(plain_params)
    ratio = n_target / n_hyper
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"target parameters: {n_target:,}")
    print(f"hypernetwork trainable parameters: {n_hyper:,}")
    print(f"compression ratio: {ratio:.2f}x (target parameters / hypernetwork parameters)")
    assert ratio > 1, "the hypernetwork should be smaller than its target"

    options = dict(steps=steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    histories = {
        "hypernetwork": train(
            lambda p, x: hypernetwork.apply({"params": p}, x)[0],
            hyper_params,
            data,
            name="hypernetwork",
            **options,
        )
    }
    accuracy = histories["hypernetwork"]["test_acc"][-1]
    print(f"test accuracy (hypernetwork, {n_hyper:,} parameters): {accuracy:.2%}")
    if args.quick:  # compiling a second model would double the time of a smoke run
        print("plain target: not trained with --quick")
    else:
        histories["plain target"] = train(
            lambda p, x: target.apply({"params": p}, x),
            plain_params,
            data,
            name="plain target",
            **options,
        )
        print(
            f"test accuracy (plain target, {n_target:,} parameters): "
            f"{histories['plain target']['test_acc'][-1]:.2%}"
        )
    path = out_dir / "curves_flax.png"
    plot_curves(
        histories,
        path,
        f"digits (Flax): runtime FlaxHyperNetwork ({n_hyper:,} trained parameters, "
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
