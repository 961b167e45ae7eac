"""A tiny Llama decoder (transformers), built from a config: nothing is downloaded."""

import torch
import transformers


def make_target():
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaModel(cfg)


example_input = torch.zeros(2, 8, dtype=torch.long)
