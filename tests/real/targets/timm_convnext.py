"""A tiny ConvNeXt written as timm writes it (timm.models.convnext): depthwise 7x7 conv,
channels-last LayerNorm (LayerNorm2d: permute, F.layer_norm, permute back), an MLP of
nn.Linear, layer scale ``gamma`` (a parameter used directly), DropPath, and timm's
``trunc_normal_(std=.02)`` init with zero biases. Small widths and depths."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # channels last
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = x.mul(self.gamma).permute(0, 3, 1, 2)
        return self.drop_path(x) + shortcut


class ConvNeXt(nn.Module):
    def __init__(self, depths=(1, 1, 2, 1), dims=(8, 16, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)
        )
        rates = torch.linspace(0, 0.1, sum(depths)).tolist()
        stages, cur, prev = [], 0, dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            down = []
            if i > 0:
                down = [LayerNorm2d(prev, eps=1e-6), nn.Conv2d(prev, dim, 2, stride=2)]
            blocks = [ConvNeXtBlock(dim, rates[cur + j]) for j in range(depth)]
            stages.append(nn.Sequential(*down, *blocks))
            cur, prev = cur + depth, dim
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm_pre(x.mean((2, 3))))


def make_target() -> ConvNeXt:
    return ConvNeXt()


example_input = torch.zeros(2, 3, 32, 32)
