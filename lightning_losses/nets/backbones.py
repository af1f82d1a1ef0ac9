"""Feature backbones: torchvision ResNets, a small CNN for digits, and a BatchNorm-free MLP.

Every backbone maps (B, C, H, W) inputs to (B, feature_dim) penultimate features (globally pooled,
post-ReLU: what a linear classifier would take) and exposes an int ``feature_dim`` attribute.
torchvision is imported inside :class:`TorchvisionBackbone` only, so importing this module stays
cheap and never imports torchvision's data sets.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lightning_losses.checks import check_positive_int

__all__ = [
    "TORCHVISION_RESNETS",
    "MLPBackbone",
    "SmallCNN",
    "TorchvisionBackbone",
    "feature_dim_of",
    "load_state_dict_file",
]

#: The torchvision model names :class:`TorchvisionBackbone` accepts.
TORCHVISION_RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file without executing arbitrary code.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``.

    Args:
        path: a local file holding a flat mapping from parameter names to tensors.

    Returns:
        The state dict, on the CPU.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if the file cannot be unpickled safely or does not hold a mapping of tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights: no such file: {str(file)!r}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(file), device="cpu")
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"weights: {str(file)!r} could not be loaded with weights_only=True (it holds "
                f"objects other than tensors and plain containers); save a plain state dict: {err}"
            ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        hint = ""
        if isinstance(state, Mapping) and "state_dict" in state:
            hint = " (it looks like a training checkpoint: save its 'state_dict' entry instead)"
        raise ValueError(
            f"weights: {str(file)!r} must hold a flat mapping from parameter names to tensors "
            f"(a state dict), got {type(state).__name__}{hint}"
        )
    return dict(state)


class TorchvisionBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning (B, feature_dim) pooled features.

    The torchvision model is always built with ``weights=None``: nothing is ever downloaded.
    Its modules (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... ``layer4``,
    ``avgpool``) are registered directly on this module, so ``state_dict()`` keys are exactly
    torchvision's (without ``fc.``) and torchvision checkpoints load as they are.

    Args:
        name: one of ``TORCHVISION_RESNETS`` (resnet18/34/50/101/152).
        in_channels: input channels; if not 3, ``conv1`` is replaced by a fresh convolution with the
            same kernel, stride and padding.
        weights: optional path of a local state dict file (``.safetensors``, or anything else
            ``torch.load(..., weights_only=True)`` reads). ``fc.*`` keys are dropped; every other
            key must match this backbone (names and shapes) or a ValueError lists the differences.
        small_input: replace the 7x7 stride-2 stem and the max pool by a 3x3 stride-1 convolution
            and no pool, the usual setting for 32x32 images (a 32x32 input then reaches ``layer4``
            at 4x4 instead of 1x1).

    Attributes:
        feature_dim: 512 for resnet18/34, 2048 for resnet50/101/152.
    """

    def __init__(
        self,
        name: str = "resnet18",
        in_channels: int = 3,
        weights: str | None = None,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"name must be one of {', '.join(TORCHVISION_RESNETS)}, got {name!r}")
        check_positive_int(in_channels, "in_channels")
        from torchvision import models

        model = getattr(models, name)(weights=None)
        self.name = name
        self.feature_dim: int = int(model.fc.in_features)
        if small_input:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(
                in_channels,
                old.out_channels,
                kernel_size=old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                bias=False,
            )
        if small_input or in_channels != 3:
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")

        self.conv1 = model.conv1
        self.bn1 = model.bn1
        self.relu = model.relu
        self.maxpool = model.maxpool
        self.layer1 = model.layer1
        self.layer2 = model.layer2
        self.layer3 = model.layer3
        self.layer4 = model.layer4
        self.avgpool = model.avgpool
        self.fc = nn.Identity()

        if weights is not None:
            self.load_weights(weights)

    def load_weights(self, path: str | os.PathLike[str], keep_fc: bool = False) -> None:
        """Load a local state dict file (see :func:`load_state_dict_file`), ignoring ``fc.*`` keys
        unless ``keep_fc`` (then the classifier layer must match too).

        Raises:
            ValueError: naming the missing keys, the unexpected keys and the keys whose shapes
                differ, if the file's weights (without ``fc.*``) do not match this backbone.
        """
        state = load_state_dict_file(path)
        if not keep_fc:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = sorted(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if state[k].shape != own[k].shape
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"weights: {str(path)!r} does not match {type(self).__name__}(name={self.name!r}). "
                f"Missing keys ({len(missing)}): {_preview(missing)}; "
                f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}; "
                f"shape mismatches ({len(mismatched)}): {_preview(mismatched)}"
            )
        self.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to pooled features (B, feature_dim), all >= 0."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchvisionClassifier(TorchvisionBackbone):
    """A whole torchvision ResNet, classifier layer included, returning (B, num_classes) logits.

    For post-hoc calibration of a pretrained model: ``weights`` is a LOCAL state dict file (e.g.
    torchvision's ``resnet152-*.pth`` copied to the machine), loaded with ``weights_only=True``
    or safetensors; ``state_dict()`` keys are torchvision's. Nothing is ever downloaded.
    """

    def __init__(
        self, name: str = "resnet152", num_classes: int = 1000, weights: str | None = None
    ) -> None:
        super().__init__(name=name)
        check_positive_int(num_classes, "num_classes")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.feature_dim, num_classes)
        if weights is not None:
            self.load_weights(weights, keep_fc=True)


def _preview(items: list[str], limit: int = 8) -> str:
    """Join at most ``limit`` items for an error message."""
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 same-padding convolution, BatchNorm and ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """A small conv net for 8x8 to 32x32 images (digits), returning (B, feature_dim) features.

    conv3x3(width)-BN-ReLU, conv3x3(width)-BN-ReLU, 2x2 max pool, conv3x3(2*width)-BN-ReLU,
    conv3x3(feature_dim)-BN-ReLU, global average pool. About 65k parameters with the defaults.
    Any input with H, W >= 2 works (the pool halves them once).

    Args:
        in_channels: input channels (1 for grey digits).
        width: channels of the first two convolutions; the third has ``2 * width``.
        feature_dim: channels of the last convolution, i.e. the size of the returned features.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(width, "width")
        check_positive_int(feature_dim, "feature_dim")
        self.feature_dim: int = feature_dim
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            *_conv_bn_relu(2 * width, feature_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, in_channels, H, W) to pooled features (B, feature_dim), all >= 0."""
        return self.features(x)


class MLPBackbone(nn.Module):
    """Flatten, then ``num_layers`` Linear+ReLU layers; no BatchNorm, no dropout.

    Being free of batch statistics, its outputs for a sample do not depend on the rest of the
    batch, which keeps single-process and DDP training exactly equivalent.

    Args:
        in_features: number of values per flattened sample (C * H * W for images).
        hidden: width of the hidden layers.
        feature_dim: width of the last layer, i.e. the size of the returned features.
        num_layers: number of Linear+ReLU layers (1 means in_features -> feature_dim directly).
    """

    def __init__(
        self, in_features: int, hidden: int = 64, feature_dim: int = 32, num_layers: int = 2
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(hidden, "hidden")
        check_positive_int(feature_dim, "feature_dim")
        check_positive_int(num_layers, "num_layers")
        self.in_features = in_features
        self.feature_dim: int = feature_dim
        sizes = [in_features] + [hidden] * (num_layers - 1) + [feature_dim]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, ...) inputs with ``in_features`` values per sample to (B, feature_dim)."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLPBackbone expects {self.in_features} values per sample (in_features), "
                f"got an input of shape {tuple(x.shape)} after flattening"
            )
        return self.net(x)


def feature_dim_of(backbone: nn.Module) -> int:
    """Return ``backbone.feature_dim``, the size of the features it returns.

    Raises:
        ValueError: if the backbone has no positive int ``feature_dim`` attribute; set one on the
            backbone or pass ``feature_dim`` explicitly to whatever needs it.
    """
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(
            f"backbone {type(backbone).__name__} has no positive int `feature_dim` attribute "
            f"(found {dim!r}); set a `feature_dim` attribute on the backbone or pass "
            f"feature_dim explicitly"
        )
    return dim
