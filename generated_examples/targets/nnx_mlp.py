"""Small MLP target (Flax nnx): 8 inputs -> two tanh layers of 64 -> 4 outputs, via make_target()."""

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.hidden1 = nnx.Linear(8, 64, rngs=rngs)
        self.hidden2 = nnx.Linear(64, 64, rngs=rngs)
        self.out = nnx.Linear(64, 4, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.tanh(self.hidden1(x))
        x = jnp.tanh(self.hidden2(x))
        return self.out(x)


def make_target() -> MLP:
    return MLP(rngs=nnx.Rngs(0))


example_input = jnp.zeros((1, 8))
