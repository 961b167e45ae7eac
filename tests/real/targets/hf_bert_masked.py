"""The tiny BERT encoder (transformers) called with a padding ``attention_mask=`` keyword."""

import torch
import transformers


def make_target():
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def example_call():
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # the second sequence is padded
    return (ids,), {"attention_mask": mask}
