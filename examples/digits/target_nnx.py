"""``target.py``'s CNN in Flax NNX, the target of the Flax digits example (``train_flax.py``).

The same layers and 38,282 trainable parameters as the PyTorch ``DigitsCNN``, on NHWC images
``(batch, 8, 8, 1)``. ``digits_nnx_static.py`` is its generated static hypernetwork.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class DigitsCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), padding=1, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), padding=1, rngs=rngs)
        self.hidden = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.out(x)


target = DigitsCNN(rngs=nnx.Rngs(0))


example_input = jnp.zeros((2, 8, 8, 1))
