"""Distribution-shifted test sets (1/2): synthetic corruptions of any image test set.

- :data:`CORRUPTIONS`: named corruptions of one normalised image tensor at a severity 1..5, pure
  functions of ``(image, severity, generator)`` that work for 1- or 3-channel images of any size
  (8x8 digits included): their strengths are relative to the image's own range and size.
- :class:`CorruptedDataset` / :func:`corrupted_test_sets`: deterministic corrupted copies of a
  test set (e.g. of the in-distribution test split of a data module).

The released shifted test sets on disk (CIFAR-10-C, the ImageNet variants, and
:func:`restrict_logits`) are in :mod:`lightning_losses.datamodules.shifted_sets` and
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_losses.datamodules.base import item_index
from lightning_losses.datamodules.shifted_sets import (  # re-exported: they lived here
    CIFAR10C_CORRUPTIONS,
    SEVERITIES,
    CIFAR10CDataset,
    ImageNetVariantFolder,
    _check_severity,
    cifar10c_test_sets,
    restrict_logits,
)
from lightning_losses.datamodules.views import mix_seed

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "CORRUPTIONS",
    "CIFAR10CDataset",
    "CorruptedDataset",
    "SEVERITIES",
    "ImageNetVariantFolder",
    "cifar10c_test_sets",
    "corrupted_test_sets",
    "restrict_logits",
]


# Parameters per severity 1..5 (index severity - 1).
_ROTATION_DEGREES = (8.0, 16.0, 24.0, 32.0, 40.0)
_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # ImageNet-C's, as a fraction of the value range
_BLUR_SIGMA = (0.5, 0.75, 1.0, 1.25, 1.5)  # pixels per 32 pixels of side (at least 1x)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # CIFAR-10-C's contrast factors
_SHIFT = (0.06, 0.12, 0.18, 0.24, 0.30)  # fraction of the side
_SALT_PEPPER = (0.03, 0.06, 0.09, 0.17, 0.27)  # ImageNet-C's impulse-noise amounts
_OCCLUSION = (0.2, 0.3, 0.4, 0.5, 0.6)  # side of the square patch, fraction of the image side


def _check_image(image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        dtype = f" {image.dtype}" if isinstance(image, Tensor) else ""
        raise ValueError(f"image must be a float tensor of shape (C, H, W), got {shape}{dtype}")


def _uniform(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _channel_min(image: Tensor) -> Tensor:
    return image.amin(dim=(-2, -1), keepdim=True)


def _warp(image: Tensor, theta: Tensor, fill: Tensor) -> Tensor:
    """Bilinear warp of ``image`` by the 2x3 affine ``theta`` (output -> input, normalised
    coordinates); pixels from outside the image get ``fill`` (per channel)."""
    c, h, w = image.shape
    grid = F.affine_grid(
        theta.to(image.device, image.dtype).unsqueeze(0), [1, c, h, w], align_corners=False
    )
    shifted = (image - fill).unsqueeze(0)
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(0) + fill


def rotation(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Rotate about the centre by ``(8, 16, 24, 32, 40)`` degrees for severity 1..5.

    The direction (sign) is drawn from ``generator``; bilinear; the corners are filled with the
    image's per-channel minimum (the background of a digit, black for a natural image).
    Non-square images rotate without shear (the aspect ratio is accounted for).
    """
    _check_image(image)
    _check_severity(severity)
    sign = 1.0 if float(_uniform(generator, 1)) < 0.5 else -1.0
    angle = math.radians(sign * _ROTATION_DEGREES[severity - 1])
    _, h, w = image.shape
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]])
    return _warp(image, theta, _channel_min(image))


def shift(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Translate by ``(0.06, 0.12, 0.18, 0.24, 0.30)`` of the side for severity 1..5.

    The direction is drawn uniformly from ``generator``; sub-pixel shifts are bilinear; the
    uncovered border is filled with the per-channel minimum.
    """
    _check_image(image)
    _check_severity(severity)
    direction = 2.0 * math.pi * float(_uniform(generator, 1))
    # In normalised coordinates the side is 2 long.
    distance = 2.0 * _SHIFT[severity - 1]
    dx, dy = distance * math.cos(direction), distance * math.sin(direction)
    theta = torch.tensor([[1.0, 0.0, -dx], [0.0, 1.0, -dy]])
    return _warp(image, theta, _channel_min(image))


def gaussian_noise(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Add i.i.d. Gaussian noise with std ``(0.08, 0.12, 0.18, 0.26, 0.38)`` x the image's value
    range (max - min), then clip to that range (ImageNet-C's values, on a [0, 1] image).

    The standard-normal draws do not depend on the severity, so one generator seed gives the
    same noise pattern, scaled, at every severity.
    """
    _check_image(image)
    _check_severity(severity)
    low, high = image.amin(), image.amax()
    noise = torch.randn(image.shape, generator=generator, device=generator.device)
    noisy = image + _NOISE_STD[severity - 1] * (high - low) * noise.to(image.device, image.dtype)
    return torch.minimum(torch.maximum(noisy, low), high)


def gaussian_blur(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur with sigma ``(0.5, 0.75, 1.0, 1.25, 1.5)`` x ``max(1, side / 32)`` pixels.

    So 0.5 to 1.5 pixels on digits and CIFAR, 3.5 to 10.5 on 224-pixel images. Separable kernel
    of radius ``ceil(3 sigma)`` (at most side - 1), reflect padding. Deterministic (the
    generator is not used).
    """
    _check_image(image)
    _check_severity(severity)
    c, h, w = image.shape
    sigma = _BLUR_SIGMA[severity - 1] * max(1.0, min(h, w) / 32.0)
    out = image.unsqueeze(0)
    for dim, size in ((-1, w), (-2, h)):
        radius = min(math.ceil(3.0 * sigma), size - 1)
        if radius < 1:
            continue
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = (kernel / kernel.sum()).repeat(c, 1)
        if dim == -1:
            padded = F.pad(out, (radius, radius, 0, 0), mode="reflect")
            out = F.conv2d(padded, kernel.view(c, 1, 1, -1), groups=c)
        else:
            padded = F.pad(out, (0, 0, radius, radius), mode="reflect")
            out = F.conv2d(padded, kernel.view(c, 1, -1, 1), groups=c)
    return out.squeeze(0)


def contrast(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Scale each channel about its mean by ``(0.75, 0.5, 0.4, 0.3, 0.15)`` (CIFAR-10-C's factors).

    Deterministic (the generator is not used).
    """
    _check_image(image)
    _check_severity(severity)
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return (image - mean) * _CONTRAST[severity - 1] + mean


def salt_pepper(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Set a fraction ``(0.03, 0.06, 0.09, 0.17, 0.27)`` of the pixels (all channels of a pixel
    together) to the image's max ("salt") or min ("pepper"), half and half in expectation.

    The corrupted pixels are those whose uniform draw falls below the fraction, so a higher
    severity corrupts a superset of the pixels of a lower one (same generator seed).
    """
    _check_image(image)
    _check_severity(severity)
    _, h, w = image.shape
    hit = _uniform(generator, 1, h, w).to(image.device) < _SALT_PEPPER[severity - 1]
    salt = _uniform(generator, 1, h, w).to(image.device) < 0.5
    out = torch.where(hit & salt, image.amax(), image)
    return torch.where(hit & ~salt, image.amin(), out)


def occlusion(image: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Cover a square of side ``(0.2, 0.3, 0.4, 0.5, 0.6)`` x the shorter side with the
    per-channel mean (cutout). The centre is drawn uniformly over the image; the square is
    clipped at the border, and grows about the same centre with the severity."""
    _check_image(image)
    _check_severity(severity)
    _, h, w = image.shape
    cy, cx = (_uniform(generator, 2) * torch.tensor([h, w])).tolist()
    half = _OCCLUSION[severity - 1] * min(h, w) / 2.0
    rows = torch.arange(h, device=image.device).view(-1, 1) + 0.5
    cols = torch.arange(w, device=image.device).view(1, -1) + 0.5
    mask = ((rows - cy).abs() <= half) & ((cols - cx).abs() <= half)
    return torch.where(mask, image.mean(dim=(-2, -1), keepdim=True), image)


#: Named corruptions: ``name -> fn(image (C, H, W), severity 1..5, generator) -> image``.
#: Users may register their own function under a new name.
CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "rotation": rotation,
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "shift": shift,
    "salt_pepper": salt_pepper,
    "occlusion": occlusion,
}


def _check_corruption(corruption: Any) -> None:
    if not isinstance(corruption, str) or corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {sorted(CORRUPTIONS)}, got {corruption!r}")


class CorruptedDataset(Dataset):
    """A copy of ``dataset`` with one corruption at one severity, deterministic per item.

    Item ``i`` is ``(CORRUPTIONS[corruption](image, severity, generator), label)`` with a fresh
    CPU generator seeded by :func:`~lightning_losses.datamodules.views.mix_seed` ``(seed, i)``:
    the same item always gets the same corruption, independent of access order, workers and of
    the global RNG. The seed does not depend on the severity, so the random parts (noise pattern,
    direction, patch centre) of one item agree across severities and only the strength changes.

    Args:
        dataset: data set of ``(float image tensor (C, H, W), label)``.
        corruption: a key of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong).
        seed: seed of the random parts.
    """

    def __init__(self, dataset: Dataset, corruption: str, severity: int, seed: int = 0) -> None:
        _check_corruption(corruption)
        _check_severity(severity)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.dataset = dataset
        self.corruption = corruption
        self.severity = severity
        self.seed = seed

    @property
    def name(self) -> str:
        """``"<corruption>-<severity>"``."""
        return f"{self.corruption}-{self.severity}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        index = item_index(index, len(self))
        image, label = self.dataset[index]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, index))
        return CORRUPTIONS[self.corruption](image, self.severity, generator), label


def corrupted_test_sets(
    dataset: Dataset,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
) -> dict[str, Dataset]:
    """Corrupted copies of ``dataset``: ``{"rotation-1": ..., "rotation-3": ..., ...}``.

    Ordered by corruption, then severity (both in the order given).

    Args:
        dataset: data set of ``(float image tensor (C, H, W), label)``.
        corruptions: keys of :data:`CORRUPTIONS` (None: all of them, in registry order).
        severities: severities in 1..5.
        seed: seed of every :class:`CorruptedDataset`.
    """
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    if isinstance(corruptions, str):
        raise ValueError(f"corruptions must be a sequence of names, got the string {corruptions!r}")
    for name in names:
        _check_corruption(name)
    severities = list(severities)
    for severity in severities:
        _check_severity(severity)
    if len(set(names)) != len(names) or len(set(severities)) != len(severities):
        raise ValueError(
            f"corruptions and severities must not repeat, got {names} and {severities}"
        )
    return {
        f"{name}-{severity}": CorruptedDataset(dataset, name, severity, seed)
        for name in names
        for severity in severities
    }
