"""Zero-initialised weights (torchvision's ViT head, DiT's adaLN-Zero; repro r8).

With ``param_scale = 0`` the first backward gave the embedding and the weight generator exactly
zero gradient. A zero-initialised weight now starts at std ``0.01 / sqrt(fan_in)``: the output
starts near the target's own (zero) and one training step moves everything.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hypernn_gen.design import ZERO_START
from hypernn_gen.runtime.torch import TorchHyperNetwork


class ZeroHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_zero_head_starts_near_zero_and_one_step_trains_everything(mode: str) -> None:
    torch.manual_seed(0)
    hyper = TorchHyperNetwork(ZeroHead(), mode=mode, condition_dim=4)
    spec = {t.path: t for t in hyper.layout.generated}
    assert spec["head.weight"].init_std == pytest.approx(ZERO_START / math.sqrt(8), rel=1e-5)
    assert spec["head.bias"].init_std == 0.0  # a zero bias stays zero; its shift trains it
    assert spec["body.weight"].init_std > 0.1  # the others keep the target's own statistics
    x = torch.randn(16, 4)
    out, _ = hyper(x)
    bound = 8 * 6 * spec["head.weight"].init_std  # |tanh| < 1: fan_in x 6 sigma per weight
    assert 0 < float(out.abs().max()) < bound
    out.square().mean().backward()
    for part in ("embedding_module", "weight_generator"):
        norm = sum(float(p.grad.norm()) for n, p in hyper.named_parameters() if n.startswith(part))
        assert norm > 0, f"{part} got a zero gradient"
    assert hyper.param_scale.grad is not None and float(hyper.param_scale.grad.abs().sum()) > 0
