"""Small MLP target (Flax linen): 8 inputs -> two tanh layers of 64 -> 4 outputs."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.tanh(nn.Dense(64)(x))
        x = nn.tanh(nn.Dense(64)(x))
        return nn.Dense(4, use_bias=False)(x)


example_input = jnp.zeros((1, 8))
