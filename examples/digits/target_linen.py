"""``target.py``'s CNN in Flax Linen, the target of ``train_flax.py --api linen``.

The same layers and 38,282 trainable parameters as the PyTorch ``DigitsCNN``, on NHWC images
``(batch, 8, 8, 1)``. ``digits_linen_static.py`` is its generated static hypernetwork.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class DigitsCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, kernel_size=(3, 3), padding=1)(x))
        x = nn.relu(nn.Conv(32, kernel_size=(3, 3), padding=1)(x))
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


example_input = jnp.zeros((2, 8, 8, 1))
