"""DMD2's GAN discriminator: a small head on a denoiser's bottleneck features.

DMD2 (Yin et al. 2024) reads the FAKE denoiser's bottleneck (the UNet's mid block) on noised
real and generated images and classifies them with a small convolutional head; the head and the
fake denoiser's trunk are trained by the discriminator loss, the generator by the generator loss
(:mod:`lightning_losses.losses.gan`). :class:`FeatureTap` captures the bottleneck with a forward
hook; :class:`GANHead` is the head. DMD2's ImageNet-64 head on an 8 x 8 bottleneck is conv 4x4 /
stride 2, GroupNorm(32), SiLU, conv 4x4 / stride 4, GroupNorm, SiLU, conv 1x1 -> one logit; ours
has the same layers with the second kernel sized to reach 1 x 1 from any even bottleneck side (our
choice for the small digits and CIFAR UNets), and GroupNorm groups that divide the channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_losses.checks import check_positive_int, check_tensor

__all__ = ["FeatureTap", "GANHead"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class GANHead(nn.Module):
    """Conv 4x4/2 -> GN -> SiLU -> conv k x k / k -> GN -> SiLU -> conv 1x1: one logit per image.

    Args:
        in_channels: the bottleneck's channels.
        spatial_size: the bottleneck's side (>= 2, even); ``k = spatial_size // 2``, so the
            second convolution ends at 1 x 1 (DMD2: 8 -> 4 -> 1).
        hidden_channels: the head's width (default: ``in_channels``, as DMD2).

    ``forward(features)`` takes ``(B, in_channels, s, s)`` and returns ``(B,)`` logits, in
    float32 at least.
    """

    def __init__(
        self, in_channels: int, spatial_size: int, hidden_channels: int | None = None
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(spatial_size, "spatial_size")
        if spatial_size < 2 or spatial_size % 2:
            raise ValueError(
                f"spatial_size must be an even side >= 2 (the bottleneck's), got {spatial_size}"
            )
        width = in_channels if hidden_channels is None else hidden_channels
        check_positive_int(width, "hidden_channels")
        self.in_channels, self.spatial_size = in_channels, spatial_size
        k = spatial_size // 2
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1),
            _norm(width),
            nn.SiLU(),
            nn.Conv2d(width, width, kernel_size=k, stride=k),
            _norm(width),
            nn.SiLU(),
            nn.Conv2d(width, 1, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        shape = f"(B, {self.in_channels}, {self.spatial_size}, {self.spatial_size})"
        check_tensor(features, "features", 4, shape)
        expected = (self.in_channels, self.spatial_size, self.spatial_size)
        if tuple(features.shape[1:]) != expected:
            raise ValueError(f"features must have shape {shape}, got {tuple(features.shape)}")
        dtype = next(self.parameters()).dtype
        return self.layers(features.to(dtype)).flatten().float()


class FeatureTap:
    """Capture the output of ``model``'s sub-module at ``path`` with a forward hook.

    ``with FeatureTap(fake_denoiser, "unet.mid_block") as tap: fake_denoiser(x, sigma)`` leaves
    the sub-module's output (with its graph) in ``tap.features``; the hook is removed on exit.

    Raises:
        ValueError: when ``path`` names no sub-module (the message lists the top-level names).
    """

    def __init__(self, model: nn.Module, path: str = "unet.mid_block") -> None:
        try:
            self.module = model.get_submodule(path)
        except AttributeError as error:
            names = [name for name, _ in model.named_children()]
            raise ValueError(
                f"path {path!r} names no sub-module of {type(model).__name__} (its children: "
                f"{names}); pass the bottleneck's dotted path, e.g. 'unet.mid_block'"
            ) from error
        self.path = path
        self.features: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        self.features = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]

    def __enter__(self) -> FeatureTap:
        self.features = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> Tensor:
        """The captured features (cleared); RuntimeError when the sub-module did not run."""
        if self.features is None:
            raise RuntimeError(f"{self.path!r} did not run inside the FeatureTap context")
        features, self.features = self.features, None
        return features
