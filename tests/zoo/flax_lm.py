"""A decoder-only transformer language model in the style of Flax's lm1b example, tiny.

Its defining traits: a frozen ``TransformerConfig`` dataclass, a learned positional embedding
(``AddPositionEmbs``: a parameter used directly), ``shift_right`` of the inputs, a causal mask,
``nn.MultiHeadDotProductAttention`` and dropout driven by a keyword-only ``deterministic`` flag
with no default, and logits from the shared input embedding (``nn.Embed.attend``).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 32
    emb_dim: int = 16
    num_heads: int = 2
    num_layers: int = 1
    qkv_dim: int = 16
    mlp_dim: int = 32
    max_len: int = 16
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    dtype: Any = jnp.float32


def shift_right(x: jnp.ndarray, axis: int = 1) -> jnp.ndarray:
    """Shift the input to the right by padding on axis 1."""
    pad_widths = [(0, 0)] * len(x.shape)
    pad_widths[axis] = (1, 0)
    padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
    return padded[:, :-1]


class AddPositionEmbs(nn.Module):
    """Adds learned positional embeddings to the inputs."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        length = inputs.shape[1]
        pos_embedding = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, self.config.max_len, inputs.shape[-1]),
        )
        return inputs + pos_embedding[:, :length, :]


class MlpBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        x = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype)(inputs)
        x = nn.relu(x)
        x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(inputs.shape[-1], dtype=cfg.dtype)(x)
        return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class DecoderBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(
        self, inputs: jnp.ndarray, decoder_mask: jnp.ndarray, *, deterministic: bool
    ) -> jnp.ndarray:
        cfg = self.config
        x = nn.LayerNorm(dtype=cfg.dtype)(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads,
            dtype=cfg.dtype,
            qkv_features=cfg.qkv_dim,
            dropout_rate=cfg.attention_dropout_rate,
            deterministic=deterministic,
        )(x, mask=decoder_mask)
        x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)
        x = x + inputs
        z = nn.LayerNorm(dtype=cfg.dtype)(x)
        return x + MlpBlock(config=cfg)(z, deterministic=deterministic)


class TransformerLM(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        embed = nn.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.emb_dim,
            embedding_init=nn.initializers.normal(stddev=1.0),
        )
        y = embed(shift_right(inputs).astype("int32"))
        y = AddPositionEmbs(config=cfg)(y)
        y = nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=deterministic)
        mask = nn.make_causal_mask(inputs, dtype=cfg.dtype)
        for lyr in range(cfg.num_layers):
            y = DecoderBlock(config=cfg, name=f"decoderblock_{lyr}")(
                y, mask, deterministic=deterministic
            )
        y = nn.LayerNorm(dtype=cfg.dtype, name="encoderdecoder_norm")(y)
        logits = embed.attend(y.astype(jnp.float32))
        return logits / np.sqrt(y.shape[-1])


def make_target() -> TransformerLM:
    return TransformerLM(config=TransformerConfig())


example_call = ((jnp.zeros((2, 8), jnp.int32),), {"deterministic": True})
