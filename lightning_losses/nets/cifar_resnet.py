"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", Sec. 4.2).

A 3x3 convolution stem with ``width`` channels, then three stages of ``n = (depth - 2) / 6``
BasicBlocks with ``width``, ``2 * width`` and ``4 * width`` channels (stride 2 at the first block of
stages 2 and 3), BatchNorm and ReLU after every convolution, and a global average pool. The network
returns the pooled, post-ReLU penultimate features (what a linear classifier would take), so that a
feature loss such as OPL can read them; the classifier head lives in the LightningModule.

Shortcut choice: where a block changes the shape (stride 2 and more channels), this implementation
uses a 1x1 convolution + BatchNorm projection (the paper's option B) rather than the parameter-free
zero-padded identity (option A) used for the paper's CIFAR table. Option B adds a few thousand
parameters (about 1% for ResNet-20, less for deeper ones); every other shortcut is the identity.
Checkpoints from option-A implementations therefore do not load into this class.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_losses.checks import check_positive_int

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection and a ReLU after the sum.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (1 or 2).

    When ``stride != 1`` or the channel count changes, the shortcut is a 1x1 convolution (with the
    same stride) followed by BatchNorm (option B); otherwise it is the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_channels, H, W) to (B, out_channels, H / stride, W / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet returning (B, 4 * width) pooled post-ReLU features.

    Args:
        depth: total number of weighted layers; ``(depth - 2) % 6 == 0`` and ``depth >= 8``
            (20, 32, 44, 56, 110, ...). Each stage holds ``(depth - 2) // 6`` BasicBlocks.
        in_channels: channels of the input images (3 for CIFAR, 1 for grey digits).
        width: channels of the stem and the first stage (16 in the paper); the later stages use
            ``2 * width`` and ``4 * width``.

    Attributes:
        feature_dim: size of the returned features, ``4 * width`` (64 by default).
        depth: the depth it was built with.
        blocks_per_stage: ``(depth - 2) // 6``.

    Convolutions get Kaiming-normal initialisation (fan_out, ReLU), BatchNorm starts at weight 1 and
    bias 0. Any input size works; the paper's setting is 32x32 (8x8 maps after stage 3).
    """

    def __init__(self, depth: int = 56, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ValueError(f"depth must be an int, got {depth!r}")
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"depth must satisfy (depth - 2) % 6 == 0 and depth >= 8 "
                f"(e.g. 20, 32, 44, 56, 110), got {depth}"
            )
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, "width")

        self.depth = depth
        self.blocks_per_stage = (depth - 2) // 6
        self.feature_dim: int = 4 * width

        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(width, width, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_weights()

    def _make_stage(self, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        """Build one stage: a (possibly strided) block, then identity-shortcut blocks."""
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [
            BasicBlock(out_channels, out_channels, 1) for _ in range(self.blocks_per_stage - 1)
        ]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        """Kaiming-normal convolutions, BatchNorm weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to pooled features (B, feature_dim), all >= 0."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(self.avgpool(out), 1)


def resnet20(in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, about 0.27M parameters, 64-d features)."""
    return CifarResNet(20, in_channels=in_channels)


def resnet32(in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage, about 0.46M parameters, 64-d features)."""
    return CifarResNet(32, in_channels=in_channels)


def resnet44(in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage, about 0.66M parameters, 64-d features)."""
    return CifarResNet(44, in_channels=in_channels)


def resnet56(in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, about 0.85M parameters, 64-d features)."""
    return CifarResNet(56, in_channels=in_channels)


def resnet110(in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage, about 1.7M parameters, 64-d features)."""
    return CifarResNet(110, in_channels=in_channels)
