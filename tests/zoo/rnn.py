"""Zoo: a sequence classifier with an LSTM and a GRU (batch_first), inputs (batch, 6, 4)."""

import torch
from torch import nn


class RecurrentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


example_input = torch.zeros(2, 6, 4)
