"""Zoo: nested ModuleList / ModuleDict / Sequential containers."""

import torch
from torch import nn


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 6), nn.GELU()), nn.Sequential(nn.Linear(6, 6), nn.Tanh())]
        )
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 2), "b": nn.Linear(6, 2, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.heads["a"](x) - self.heads["b"](x)


example_input = torch.zeros(2, 6)
