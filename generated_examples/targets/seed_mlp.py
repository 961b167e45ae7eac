"""Seed MLP target (PyTorch): 8 inputs -> two tanh layers of 256 -> 4 outputs, built by make_target()."""

import torch
from torch import nn


def make_target() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.Tanh(),
        nn.Linear(256, 4, bias=False),
    )


example_input = torch.zeros(1, 8)
