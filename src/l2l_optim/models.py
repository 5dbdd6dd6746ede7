"""The optimizee models of the paper's experiments, all for 1x28x28 inputs and 10 classes.

* :func:`base_mlp`: the paper's base optimizee, 784-500-10 (397,510 parameters);
* :func:`lenet`: LeNet-5 (61,706 parameters);
* :func:`mlp5`: a 5-layer MLP with 16x the base MLP's parameters (6,368,050);
* :func:`resnet_small` / :class:`ResNetSmall`: ResNet-18's layout (11,172,810 parameters);
* :func:`resnet_narrow`: the same layout at a quarter of the width (701,178 parameters).

:data:`l2l_optim.tasks.TASKS` pairs them with datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["base_mlp", "lenet", "mlp5", "MLP5_WIDTH", "ResNetSmall", "resnet_small", "RESNET_NARROW_WIDTH",
           "resnet_narrow"]


def base_mlp() -> nn.Module:
    """The paper's base optimizee: 784-500-10 MLP with ReLU (397,510 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))


def lenet() -> nn.Module:
    """LeNet-5 for 1x28x28 inputs, with ReLU and max-pooling (61,706 parameters).

    conv 5x5 (1 -> 6, padding 2) -> ReLU -> maxpool 2 -> conv 5x5 (6 -> 16) -> ReLU ->
    maxpool 2 -> 400 -> 120 -> 84 -> 10 (ReLU between the linear layers).
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


#: hidden width of :func:`mlp5`: 784-1330-1330-1330-1330-10 has 6,368,050 parameters,
#: 16.02x the base MLP's 397,510 (the paper's "16x" 5-layer MLP)
MLP5_WIDTH = 1330


def mlp5(width: int = MLP5_WIDTH) -> nn.Module:
    """A 5-layer MLP on MNIST: 784-w-w-w-w-10 with ReLU (6,368,050 parameters at w=1330)."""
    dims = [784, width, width, width, width, 10]
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(5):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < 4:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN layers and an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-18 (4 stages of 2 basic blocks, BatchNorm) for 1x28x28 inputs.

    The layout is ResNet-18's with the ImageNet-style downsampling stem, which shrinks the
    28x28 input to 7x7 before the first stage and so keeps the model affordable on a CPU:
    conv 3x3 stride 2 (28 -> 14) + BN + ReLU, max-pool 3x3 stride 2 (14 -> 7), then stages
    of ``w, 2w, 4w, 8w`` channels at 7x7, 4x4, 2x2, 1x1, global average pool and a linear
    classifier. With ``width=64`` (ResNet-18's own widths) it has 11,172,810 parameters,
    28.1x the base MLP.
    """

    def __init__(self, width: int = 64, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_small(width: int = 64) -> nn.Module:
    """:class:`ResNetSmall`, the ResNet-18-style CNN of the large-model experiment (fig5b)."""
    return ResNetSmall(width=width)


#: width of :func:`resnet_narrow`: stages of 16, 32, 64, 128 channels give 701,178 parameters,
#: 1.76x the base MLP's 397,510, and a training step of ~45-60 ms on one CPU core (batch 128),
#: so 2,000 steps x 3 seeds of four optimizers (24,000 steps) take about 20 minutes of one core
RESNET_NARROW_WIDTH = 16


def resnet_narrow(width: int = RESNET_NARROW_WIDTH) -> nn.Module:
    """:class:`ResNetSmall` at width 16 (701,178 parameters), the CNN of the long large-model
    experiment (fig5b-long), where ResNet-18's own widths cost too much per step."""
    return ResNetSmall(width=width)
