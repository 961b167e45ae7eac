"""Small CNN target (Flax linen) for 8x8x1 images: conv + batch norm (batch_stats) + dense -> 10."""

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(8, kernel_size=(3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


example_input = jnp.zeros((2, 8, 8, 1))
