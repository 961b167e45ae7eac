"""Tiny GPT-like language model (Flax nnx): embedding tied via embed.attend, one pre-LN block."""

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, D_MODEL, CONTEXT, HEADS = 64, 32, 16, 4


class Block(nnx.Module):
    """Pre-LN transformer block: causal self-attention and an MLP, each with a residual."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D_MODEL, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.fc = nnx.Linear(D_MODEL, 4 * D_MODEL, rngs=rngs)
        self.proj = nnx.Linear(4 * D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], dtype=jnp.int32))
        h = self.ln1(x)
        x = x + self.attn(h, h, mask=mask)
        return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class TinyGPT(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.pos_emb = nnx.Param(jax.random.normal(rngs.params(), (CONTEXT, D_MODEL)) * 0.02)
        self.block = Block(rngs=rngs)
        self.ln_f = nnx.LayerNorm(D_MODEL, rngs=rngs)

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = self.embed(idx) + self.pos_emb[: idx.shape[1]]
        return self.embed.attend(self.ln_f(self.block(x)))  # weight tying


def make_target() -> TinyGPT:
    return TinyGPT(rngs=nnx.Rngs(0))


example_input = jnp.zeros((2, CONTEXT), dtype=jnp.int32)
