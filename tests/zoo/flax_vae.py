"""The VAE of Flax's examples/vae (models.py), tiny.

Its defining traits: an ``Encoder`` and a ``Decoder`` built in ``setup``, named ``nn.Dense``
layers, ``__call__(x, z_rng)`` with a typed PRNG key argument for the reparameterisation, a
three-array output ``(recon_x, mean, logvar)``, and a second method, ``generate``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import random


class Encoder(nn.Module):
    """VAE Encoder."""

    latents: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.Dense(12, name="fc1")(x)
        x = nn.relu(x)
        mean_x = nn.Dense(self.latents, name="fc2_mean")(x)
        logvar_x = nn.Dense(self.latents, name="fc2_logvar")(x)
        return mean_x, logvar_x


class Decoder(nn.Module):
    """VAE Decoder."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        z = nn.Dense(12, name="fc1")(z)
        z = nn.relu(z)
        return nn.Dense(16, name="fc2")(z)


class VAE(nn.Module):
    """Full VAE model."""

    latents: int = 3

    def setup(self) -> None:
        self.encoder = Encoder(self.latents)
        self.decoder = Decoder()

    def __call__(self, x: jax.Array, z_rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, logvar = self.encoder(x)
        z = reparameterize(z_rng, mean, logvar)
        recon_x = self.decoder(z)
        return recon_x, mean, logvar

    def generate(self, z: jax.Array) -> jax.Array:
        return nn.sigmoid(self.decoder(z))


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = random.normal(rng, logvar.shape)
    return mean + eps * std


def model(latents: int) -> VAE:
    return VAE(latents=latents)


def make_target() -> VAE:
    return model(3)


example_call = ((jnp.zeros((2, 16)), random.key(0)), {})
