"""A tiny GPT-2 decoder (transformers), built from a config: nothing is downloaded."""

import torch
import transformers


def make_target():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2Model(cfg)


example_input = torch.zeros(2, 8, dtype=torch.long)
