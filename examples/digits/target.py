"""The target network of the digits example: a small CNN for scikit-learn's 8x8 digit images.

Two 3x3 convolutions, a 2x2 max-pool and a two-layer classifier: 38,282 trainable parameters.
The hypernetwork in ``digits_torch_static.py`` generates all of them from far fewer of its own.
"""

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


example_input = torch.zeros(2, 1, 8, 8)
