"""The target network of the sinusoid example: the MLP of MAML's sinusoid experiment.

1 -> 40 -> 40 -> 1 with ReLUs, applied pointwise: ``(tasks, points, 1) -> (tasks, points, 1)``.
The dynamic hypernetwork in ``sine_torch_dynamic.py`` gives every task its own weights.
"""

import torch
from torch import nn

#: a task is observed through its values at this many fixed x positions (the condition)
GRID_POINTS = 10


class SineMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, 40),
            nn.ReLU(),
            nn.Linear(40, 40),
            nn.ReLU(),
            nn.Linear(40, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# A dynamic hypernetwork's conditioning network is sized from the first example input (its
# shape without the batch dimension). We condition on a task's values at GRID_POINTS fixed x
# positions, (tasks, GRID_POINTS, 1): the shape of a batch of GRID_POINTS query points.
example_input = torch.zeros(1, GRID_POINTS, 1)
