"""Small CNN target (Flax nnx) for 8x8x1 images: conv + batch norm + dropout + linear -> 10."""

import jax
import jax.numpy as jnp
from flax import nnx


class SmallCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear = nnx.Linear(8 * 4 * 4, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = self.dropout(x)
        return self.linear(x.reshape(x.shape[0], -1))


def make_target() -> SmallCNN:
    return SmallCNN(rngs=nnx.Rngs(0))


example_input = jnp.zeros((2, 8, 8, 1))
