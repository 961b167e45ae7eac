"""The CNN of Flax's NNX MNIST tutorial, tiny: ``__call__(x, rngs=None)`` takes the dropout rngs.

Its defining traits: ``nnx.Dropout`` built without rngs, so every call in training mode passes an
``nnx.Rngs`` to ``__call__``; ``nnx.BatchNorm`` after each convolution; ``avg_pool`` held as a
``functools.partial`` attribute; the output layer called with ``out_sharding=None``, a keyword
that ``nnx.Linear.__call__`` takes.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
    """A simple CNN model."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(4, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(8, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        return self.linear2(x, out_sharding=None)


def make_target() -> CNN:
    return CNN(rngs=nnx.Rngs(0))


def example_call() -> tuple[tuple, dict]:
    """A batch of two 8x8 images and the rngs its dropout draws from."""
    return (jnp.zeros((2, 8, 8, 1)),), {"rngs": nnx.Rngs(dropout=1)}
