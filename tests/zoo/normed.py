"""Zoo: token embedding, LayerNorm and BatchNorm1d over the sequence, then a linear head."""

import torch
from torch import nn


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids))  # (batch, 5, 8)
        x = self.bn(x.transpose(1, 2))  # (batch, 8, 5): statistics over the 5 positions
        return self.head(x.flatten(1))


example_input = torch.zeros(2, 5, dtype=torch.long)
