"""A tiny T5 encoder-decoder (transformers), built from a config: nothing is downloaded."""

import torch
import transformers


def make_target():
    cfg = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        # SDPA's CPU kernel has no gradient for a mask that needs one (T5's position bias is
        # generated per sample): the eager attention computes the same numbers
        attn_implementation="eager",
    )
    return transformers.T5Model(cfg)


def example_call():
    ids = torch.zeros(2, 8, dtype=torch.long)
    return (ids,), {"decoder_input_ids": torch.zeros(2, 5, dtype=torch.long)}
