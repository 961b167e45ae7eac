"""A tiny MobileNetV3 written as torchvision/timm write it: inverted residuals with
squeeze-excite (hard-sigmoid gate), hard-swish, BatchNorm, and stochastic depth (timm's
DropPath: ``x.new_empty(...).bernoulli_(keep)``, in place). Small widths, 32x32 inputs."""

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm.layers.drop_path."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


def conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int, act) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)]
    layers += [nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, expand, cout, k, stride, se: bool, act, drop: float) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers = [conv_bn_act(cin, expand, 1, 1, 1, act)] if expand != cin else []
        layers.append(conv_bn_act(expand, expand, k, stride, expand, act))  # depthwise
        if se:
            layers.append(SqueezeExcitation(expand, max(8, expand // 4)))
        layers.append(conv_bn_act(expand, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.drop_path = DropPath(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + self.drop_path(out) if self.use_res else out


class MobileNetV3(nn.Module):
    # (in, expand, out, kernel, stride, squeeze-excite, activation)
    SETTING = (
        (8, 8, 8, 3, 2, True, nn.ReLU),
        (8, 24, 16, 3, 2, False, nn.ReLU),
        (16, 32, 16, 3, 1, False, nn.ReLU),
        (16, 48, 24, 5, 2, True, nn.Hardswish),
        (24, 64, 24, 5, 1, True, nn.Hardswish),
    )

    def __init__(self, num_classes: int = 10, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        layers = [conv_bn_act(3, 8, 3, 2, 1, nn.Hardswish)]
        for i, (cin, e, cout, k, s, se, act) in enumerate(self.SETTING):
            drop = drop_path_rate * i / len(self.SETTING)
            layers.append(InvertedResidual(cin, e, cout, k, s, se, act, drop))
        layers.append(conv_bn_act(24, 96, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, num_classes)
        )
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def make_target() -> MobileNetV3:
    return MobileNetV3()


example_input = torch.zeros(2, 3, 32, 32)  # the last stages see 2x2 and 1x1 feature maps
