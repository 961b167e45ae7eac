"""A BERT-style encoder: transformers' BertModel from a tiny config (nothing downloaded):
2 layers, hidden 128, 2 heads, intermediate 512, vocabulary 1000, sequences of 32 tokens."""

import torch
import transformers


def make_target() -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config)


example_input = torch.zeros(2, 32, dtype=torch.long)
