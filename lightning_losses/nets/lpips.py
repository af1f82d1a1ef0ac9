"""LPIPS (Zhang et al. 2018) on a VGG-16 trunk read from a LOCAL weights file.

For images :math:`x, y` scaled to [-1, 1], with :math:`\\hat\\phi_l` the layer-l activations of
VGG-16 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), each normalised to unit length over
channels at every position, and non-negative channel weights :math:`w_l`,

.. math::

    \\mathrm{LPIPS}(x, y) = \\sum_l \\frac{1}{H_l W_l} \\sum_{h, w} \\sum_c w_{l,c}
        \\big(\\hat\\phi_l(x)_{chw} - \\hat\\phi_l(y)_{chw}\\big)^2 .

Pretrained weights cannot be downloaded here, so nothing is fetched: the file must hold the
torchvision ``vgg16().features`` state dict under ``features.*`` and, optionally, the learned
weights under ``lin{0..4}.weight`` or ``lin{0..4}.model.1.weight`` (the released LPIPS
layout), shape ``(1, C_l, 1, 1)``. Without them every :math:`w_l = 1`
(the paper's "baseline" variant; our documented choice). A missing or partial trunk is an error:
never a silent random backbone. Grayscale images are repeated to 3 channels; images are resized
to ``resize`` (DMD compares at 224) because VGG's five stages need at least 16 pixels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.nets.backbones import load_state_dict_file

__all__ = ["LPIPS"]

#: Indices (in ``vgg16().features``) of the five ReLU outputs LPIPS compares.
TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# LPIPS's input scaling of [-1, 1] images (the ImageNet statistics expressed in that range).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """The LPIPS distance, frozen, from one local weights file (module docstring).

    Args:
        weights: a ``.safetensors`` (or weights-only torch) file with the VGG-16 trunk
            (``features.<i>.weight`` / ``.bias``) and optionally ``lin<l>.weight``.
        resize: the side the images are resized to (bilinear) before VGG; None: as they come
            (then at least 16 x 16).

    Raises:
        FileNotFoundError: when ``weights`` is None or not a file (the message says what the
            file must hold; nothing is downloaded).
        ValueError: when the file lacks trunk weights or has wrongly shaped entries.
    """

    def __init__(self, weights: str | os.PathLike[str] | None, resize: int | None = 224) -> None:
        super().__init__()
        if weights is None or not os.path.isfile(weights):
            raise FileNotFoundError(
                f"LPIPS needs a local weights file, got {weights!r}: a .safetensors file with "
                "torchvision's vgg16().features state dict under 'features.*' (and optionally "
                "LPIPS's 'lin0..lin4.weight'); nothing is downloaded. Without such a file use "
                "distance='pseudo_huber'"
            )
        from torchvision.models import vgg16

        state = load_state_dict_file(weights)
        trunk = vgg16(weights=None).features[: TAPS[-1] + 1]
        trunk_state = {
            k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")
        }
        expected = trunk.state_dict()
        missing = sorted(set(expected) - set(trunk_state))
        if missing:
            raise ValueError(
                f"weights: {str(weights)!r} lacks the VGG-16 trunk entries "
                f"{['features.' + k for k in missing[:4]]}{' ...' if len(missing) > 4 else ''}"
            )
        for key, value in expected.items():
            if trunk_state[key].shape != value.shape:
                raise ValueError(
                    f"weights: {str(weights)!r} entry features.{key} has shape "
                    f"{tuple(trunk_state[key].shape)}, VGG-16 needs {tuple(value.shape)}"
                )
        trunk.load_state_dict({k: trunk_state[k] for k in expected})
        self.trunk = trunk.eval().requires_grad_(False)
        lin = []
        for layer, channels in enumerate(CHANNELS):
            w = state.get(f"lin{layer}.weight", state.get(f"lin{layer}.model.1.weight"))
            if w is None:
                w = torch.ones(1, channels, 1, 1)
            elif tuple(w.shape) != (1, channels, 1, 1):
                raise ValueError(
                    f"weights: {str(weights)!r} entry lin{layer}.weight has shape "
                    f"{tuple(w.shape)}, expected (1, {channels}, 1, 1)"
                )
            lin.append(w.float().clamp_min(0))
        self.register_buffer("lin", torch.cat([w.flatten() for w in lin]), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.resize = resize

    def train(self, mode: bool = True) -> LPIPS:
        """The network stays frozen in eval mode."""
        super().train(mode)
        self.trunk.eval()
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(
                x, size=(self.resize, self.resize), mode="bilinear", align_corners=False
            )
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for index, layer in enumerate(self.trunk):
            x = layer(x)
            if index in TAPS:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distances ``(B,)`` between ``(B, 1 | 3, H, W)`` images in [-1, 1]."""
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] not in (1, 3):
            raise ValueError(
                f"x and y must be (B, 1 or 3, H, W) images of one shape, got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        weights = self.lin.split(CHANNELS)
        total = x.new_zeros(x.shape[0])
        for w, fx, fy in zip(weights, self._features(x), self._features(y)):
            diff = (fx - fy).square() * w.to(fx.dtype).view(1, -1, 1, 1)
            total = total + diff.sum(dim=1).mean(dim=(1, 2))
        return total
