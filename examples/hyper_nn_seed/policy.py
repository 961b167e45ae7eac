"""The policy network of hyper-nn's README: 8 observations -> 256 -> 256 -> 4 actions (tanh).

These are LunarLander's sizes (hyper-nn's notebooks trained it there); ``cartpole_policy.py``
is the same network with CartPole's 4 observations and 2 actions.
"""

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
