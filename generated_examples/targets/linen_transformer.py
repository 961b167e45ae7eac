"""Tiny GPT-like language model (Flax linen): embedding tied via embed.attend, one pre-LN block."""

import flax.linen as nn
import jax.numpy as jnp

VOCAB, D_MODEL, CONTEXT, HEADS = 64, 32, 16, 4


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention and an MLP, each with a residual."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], dtype=jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(D_MODEL)(nn.gelu(nn.Dense(4 * D_MODEL)(h)))
        return x + h


class TinyGPT(nn.Module):
    @nn.compact
    def __call__(self, idx: jnp.ndarray) -> jnp.ndarray:
        embed = nn.Embed(VOCAB, D_MODEL)
        pos = self.param("pos_emb", nn.initializers.normal(0.02), (CONTEXT, D_MODEL))
        x = embed(idx) + pos[: idx.shape[1]]
        x = nn.LayerNorm()(Block()(x))
        return embed.attend(x)  # weight tying: logits from the embedding matrix


def make_target() -> TinyGPT:
    return TinyGPT()


example_input = jnp.zeros((2, CONTEXT), dtype=jnp.int32)
