"""hyper-nn's README policy network with CartPole's sizes: 4 observations -> 256 -> 256 -> 2."""

import torch
from torch import nn


def make_target() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.Tanh(),
        nn.Linear(256, 2, bias=False),
    )


example_input = torch.zeros(1, 4)
