"""Flax targets (Linen and NNX) with convolutions the fused dynamic path must get right or leave
alone: strides, explicit and asymmetric padding, kernel dilation, a 1-D convolution (fused); a
grouped and a circular convolution, and a DenseGeneral (materialised per sample)."""

import flax.linen as nn
import jax
from flax import nnx


class LinenConvs(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 1), padding=((1, 0), (2, 1)))(x))
        x = nn.Conv(4, (2, 2), kernel_dilation=2, padding="VALID", use_bias=False)(x)
        x = nn.Conv(4, (3, 3), feature_group_count=2)(x)
        x = nn.tanh(nn.Conv(4, (3, 3), padding="CIRCULAR")(x))
        x = nn.Conv(3, (3,), padding=1)(x.reshape(x.shape[0], -1, x.shape[-1]))
        x = nn.DenseGeneral((2, 3))(x)
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class NNXConvs(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.strided = nnx.Conv(2, 4, (3, 3), strides=(2, 1), padding=((1, 0), (2, 1)), rngs=rngs)
        self.dilated = nnx.Conv(
            4, 4, (2, 2), kernel_dilation=2, padding="VALID", use_bias=False, rngs=rngs
        )
        self.grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
        self.circular = nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", rngs=rngs)
        self.conv1d = nnx.Conv(4, 3, (3,), padding=1, rngs=rngs)
        self.general = nnx.LinearGeneral(3, (2, 3), rngs=rngs)
        self.out = nnx.Linear(16 * 6, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dilated(nnx.relu(self.strided(x)))
        x = nnx.tanh(self.circular(self.grouped(x)))
        x = self.general(self.conv1d(x.reshape(x.shape[0], -1, x.shape[-1])))
        return self.out(x.reshape(x.shape[0], -1))


def make_nnx() -> NNXConvs:
    return NNXConvs(rngs=nnx.Rngs(0))


example_input = jax.numpy.zeros((2, 9, 9, 2))
