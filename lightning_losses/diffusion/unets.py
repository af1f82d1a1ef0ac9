"""A small ``UNet2DModel`` factory for tiny images (diffusers is imported when it is called)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DModel


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(value, limit)) + 1) if value % d == 0)


def unet_for_images(
    in_channels: int,
    sample_size: int,
    channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    num_classes: int | None = None,
    attention: bool = False,
) -> UNet2DModel:
    """A ``UNet2DModel`` sized for small images (8x8 digits, 32x32 CIFAR), ready for EDMPrecond.

    One resolution level per entry of ``channels`` (``len(channels) - 1`` downsamplings, so
    ``sample_size`` must be divisible by ``2 ** (len(channels) - 1)``), ``out_channels ==
    in_channels``, the "positional" time embedding (fractional and negative EDM noise labels work).

    Choices made for tiny widths: GroupNorm uses the largest divisor of ``gcd(channels)`` that is
    at most ``min(32, channels[0] // 4)`` groups (about 4 channels a group, as diffusers' 32
    groups of 128); with ``attention=True`` every level below the full resolution uses attention
    blocks and the mid block has attention, with heads of the largest divisor of
    ``gcd(channels)`` up to 32 channels; without it no attention anywhere (also not in the mid
    block). ``num_classes`` sets ``num_class_embeds`` (a class-conditional UNet).
    """
    from diffusers import UNet2DModel

    channels = tuple(int(c) for c in channels)
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
    factor = 2 ** (len(channels) - 1)
    if sample_size < 1 or sample_size % factor:
        raise ValueError(
            f"sample_size must be a positive multiple of {factor} for {len(channels)} levels "
            f"(channels={channels}), got {sample_size}"
        )
    common = math.gcd(*channels)
    groups = _largest_divisor_at_most(common, max(1, min(32, channels[0] // 4)))
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if attention else "DownBlock2D"] * (
        len(channels) - 1
    )
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        time_embedding_type="positional",
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=_largest_divisor_at_most(common, 32),
        add_attention=attention,
        num_class_embeds=num_classes,
    )
