"""The one check of image batches that diffusion teachers and generators are trained on."""

from __future__ import annotations

import torch
from torch import Tensor

#: How far outside [-1, 1] a value may lie (interpolation and rounding) before it is an error.
RANGE_TOLERANCE = 1e-3


def check_diffusion_images(
    images: Tensor, channels: int, size: tuple[int, int] | None, role: str = "images"
) -> bool:
    """Raise ValueError unless ``images`` is a float (B, channels, *size) batch in [-1, 1].

    Args:
        images: the batch.
        channels: the channels the denoiser takes.
        size: its (H, W), or None to accept any size.
        role: how the messages name the batch (``"images"``, ``"real images"``).

    Returns:
        True when the batch lies in [0, 1], which is most likely unscaled data: the caller
        decides whether to warn. Reads two scalars in one device synchronisation.
    """
    low, high = diffusion_image_extremes(images, channels, size, role).float().tolist()
    return check_diffusion_range(low, high, role)


def diffusion_image_extremes(
    images: Tensor, channels: int, size: tuple[int, int] | None, role: str = "images"
) -> Tensor:
    """:func:`check_diffusion_images` without its host read: the layout checks (raising as
    it does), then the batch's ``(min, max)`` as a (2,) tensor on its device, NOT read; give
    them to :func:`check_diffusion_range` once read (a caller that reads several checks at
    once)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{role} must be a (B, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{role} must be floating point, got dtype {images.dtype}")
    if images.shape[1] != channels:
        raise ValueError(
            f"the {role} have {images.shape[1]} channels but the teacher takes {channels}: "
            "the data and the teacher must match"
        )
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(
            f"the {role} are {tuple(images.shape[-2:])} but the teacher's sample_size is "
            f"{tuple(size)}: set the data's image size to the teacher's"
        )
    return torch.stack(torch.aminmax(images.detach()))


def check_diffusion_range(low: float, high: float, role: str = "images") -> bool:
    """Raise ValueError unless ``[low, high]`` (a batch's extremes) lies in [-1, 1] to within
    :data:`RANGE_TOLERANCE` (NaN fails too); True when it lies in [0, 1]."""
    if not (low >= -1 - RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE):  # NaN fails too
        raise ValueError(
            f"{role} must hold finite values in [-1, 1] like the teacher's data, got values in "
            f'[{low:.3g}, {high:.3g}]: use DigitsDataModule(normalize="symmetric") (or map '
            "[0, 1] data with 2x - 1), not standardised images, and no NaN or inf"
        )
    return low >= 0
