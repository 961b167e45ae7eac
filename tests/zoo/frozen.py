"""Zoo: a frozen (requires_grad=False) feature layer under a trainable head."""

import torch
from torch import nn


def make_target() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    return model


example_input = torch.zeros(2, 5)
