"""digits-FID, and the FID pieces that :class:`~lightning_losses.callbacks.FIDCallback` shares.

The Frechet distance between two feature sets, each summarised by its mean and (unbiased)
covariance, is

.. math::

    d^2 = \\lVert \\mu_r - \\mu_g \\rVert^2
        + \\operatorname{tr}\\big(\\Sigma_r + \\Sigma_g - 2 (\\Sigma_r \\Sigma_g)^{1/2}\\big).

Everything here runs on torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance`
(float64 sums of the features and their outer products; the trace of the matrix square root
as the sum of the square roots of the eigenvalues of :math:`\\Sigma_r \\Sigma_g`), fed by
:class:`FIDFeatures`, which hands it float64 features so the distance comes back in float64.

**digits-FID** is a fixed, small stand-in for Inception FID on scikit-learn's 8x8 digits:

- features: the 64-d penultimate (globally pooled) features of the cross-entropy digits
  classifier (``SmallCNN``) that ``configs/opl/digits_ce.yaml`` trains at seed 0, at the native
  8x8, committed as ``lightning_losses/assets/digits_fid_features.safetensors`` (recreate it
  with :data:`DIGITS_FID_COMMAND`);
- real statistics: ALL 1,797 digits (:func:`digits_real_images`), whatever the data module;
- samples: :data:`DIGITS_FID_NUM_SAMPLES` (2,000) generated images in [-1, 1], clamped to
  [-1, 1] (what an image file would hold) before the features.

The numbers compare across runs of this project only: they are NOT comparable with Inception
FID (another network, another feature space, another scale) or with any published FID.

This module imports torch, torchmetrics and safetensors only (no Lightning).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_losses.nets.backbones import SmallCNN

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = [
    "DIGITS_FID_COMMAND",
    "DIGITS_FID_FORMAT",
    "DIGITS_FID_NUM_SAMPLES",
    "DigitsFIDFeatures",
    "FIDFeatures",
    "digits_fid",
    "digits_fid_features",
    "digits_fid_features_path",
    "digits_fid_metric",
    "digits_real_images",
    "fid_metric",
    "frechet_distance",
]

#: The command that recreates the committed digits-FID feature network (from the repo root).
DIGITS_FID_COMMAND = "OMP_NUM_THREADS=1 python scripts/make_digits_fid_features.py"
#: The ``format`` entry of the safetensors metadata this module reads.
DIGITS_FID_FORMAT = "lightning_losses.digits_fid_features.v1"
#: Generated samples of a digits-FID number (against all 1,797 real digits).
DIGITS_FID_NUM_SAMPLES = 2000
#: Number of scikit-learn digits.
_NUM_DIGITS = 1797
_ASSET = "digits_fid_features.safetensors"


class FIDFeatures(nn.Module):
    """Wrap a feature network for torchmetrics' FID: images in, ``(B, F)`` float64 features out.

    torchmetrics reads ``num_features`` (so it never probes the network with a 299x299 dummy)
    and returns the distance in the dtype of the features, hence the float64 cast. The wrapper
    stays in eval mode (``train()`` is a no-op), and so does the wrapped network.

    Args:
        network: maps whatever the metric is updated with (images in [-1, 1] in this project)
            to ``(B, F)`` features.
        num_features: F.

    Raises:
        ValueError: when ``num_features`` < 1, or (in ``forward``) when the network returns
            anything but ``(B, num_features)``.
    """

    def __init__(self, network: nn.Module, num_features: int) -> None:
        super().__init__()
        if isinstance(num_features, bool) or int(num_features) < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        self.network = network
        self.num_features = int(num_features)
        self.eval()

    def train(self, mode: bool = True) -> FIDFeatures:
        """Stay in eval mode: batch statistics must not leak into a metric."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``network(images)`` as float64, checked to be ``(B, num_features)``."""
        features = self.network(images)
        expected = (images.shape[0], self.num_features)
        if not isinstance(features, Tensor) or tuple(features.shape) != expected:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(
                f"the FID feature network must return (B, num_features) = {expected} features "
                f"for {tuple(images.shape)} inputs, got {shape}"
            )
        return features.double()


def fid_metric(features: nn.Module, num_features: int) -> FrechetInceptionDistance:
    """torchmetrics' FID on ``FIDFeatures(features, num_features)``, real statistics kept.

    ``reset_real_features=False``: ``reset()`` clears the generated side only.
    ``sync_on_compute=False``: ``compute()`` uses this process' sums only (no collective), so
    one rank can evaluate alone under DDP.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not isinstance(features, FIDFeatures):
        features = FIDFeatures(features, num_features)
    return FrechetInceptionDistance(
        feature=features, reset_real_features=False, normalize=True, sync_on_compute=False
    )


def frechet_distance(real_features: Tensor, fake_features: Tensor) -> float:
    """Frechet distance between two feature sets ``(N, F)`` and ``(M, F)`` (N, M >= 2).

    The same computation as every FID here (torchmetrics, float64); see the module docstring.

    Raises:
        ValueError: unless both are 2-D with the same F and at least 2 rows.
    """
    for name, value in (("real_features", real_features), ("fake_features", fake_features)):
        if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[0] < 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be an (N, F) tensor with N >= 2, got {shape}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"real_features and fake_features must have the same F, got "
            f"{real_features.shape[1]} and {fake_features.shape[1]}"
        )
    metric = fid_metric(nn.Identity(), real_features.shape[1])
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------------
# digits-FID


class DigitsFIDFeatures(nn.Module):
    """The digits-FID feature network: ``(B, 1, 8, 8)`` images in [-1, 1] -> ``(B, 64)``.

    A frozen ``SmallCNN`` (the classifier's backbone) after the classifier's own input
    normalisation. The classifier saw :math:`z = (u - m) / s` where :math:`u \\in [0, 1]` is the
    pixel (0..16 divided by 16) and m, s are the ``input_mean`` / ``input_std`` of its data
    module (``normalize="standard"``: the training split's scalar mean and std). Generated images
    are :math:`x = 2u - 1`, so this network computes

    .. math::

        f(x) = \\mathrm{backbone}\\Big(\\big(\\tfrac{x + 1}{2} - m\\big) / s\\Big),

    exactly the classifier's input for real digits (every step is exact in float32 for
    multiples of 1/16).

    Args:
        input_mean: m.
        input_std: s (> 0).
        in_channels: the backbone's input channels (1).
        width: the backbone's width.
        feature_dim: the backbone's feature size (64).
    """

    def __init__(
        self,
        input_mean: float,
        input_std: float,
        in_channels: int = 1,
        width: int = 32,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        if not input_std > 0:
            raise ValueError(f"input_std must be > 0, got {input_std!r}")
        self.backbone = SmallCNN(in_channels=in_channels, width=width, feature_dim=feature_dim)
        self.register_buffer("input_mean", torch.tensor(float(input_mean), dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(float(input_std), dtype=torch.float32))
        self.num_features = feature_dim
        self.in_channels = in_channels
        #: The safetensors metadata the network was loaded with (empty when built by hand).
        self.metadata: dict[str, str] = {}
        self.eval()

    def train(self, mode: bool = True) -> DigitsFIDFeatures:
        """Stay in eval mode (BatchNorm uses its running statistics)."""
        return super().train(False)

    def classifier_input(self, images: Tensor) -> Tensor:
        """Map [-1, 1] images to the classifier's input scale, ``((x + 1) / 2 - m) / s``."""
        return ((images + 1.0) * 0.5 - self.input_mean) / self.input_std

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 1, 8, 8)`` float images in [-1, 1] -> ``(B, 64)`` features (float32)."""
        if (
            not isinstance(images, Tensor)
            or images.ndim != 4
            or tuple(images.shape[1:]) != (self.in_channels, 8, 8)
            or not images.is_floating_point()
        ):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"digits-FID takes float (B, {self.in_channels}, 8, 8) images in [-1, 1] (the "
                f"digits' native size), got {shape}"
            )
        return self.backbone(self.classifier_input(images.float()))


def digits_fid_features_path() -> Path:
    """Where the committed digits-FID weights live (inside the installed package)."""
    return Path(str(resources.files("lightning_losses") / "assets" / _ASSET))


def digits_fid_features(path: str | os.PathLike[str] | None = None) -> DigitsFIDFeatures:
    """The committed digits-FID feature network (frozen, eval mode), loaded with safetensors.

    Args:
        path: a file written by ``scripts/make_digits_fid_features.py``; None: the one shipped
            in ``lightning_losses/assets``.

    Raises:
        FileNotFoundError: when the file is missing (the message names the command that
            recreates it).
        ValueError: when the file is not a digits-FID feature file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = digits_fid_features_path() if path is None else Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"no digits-FID feature file at {str(file)!r}; recreate it from the repository "
            f"root with: {DIGITS_FID_COMMAND}"
        )
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != DIGITS_FID_FORMAT:
        raise ValueError(
            f"{str(file)!r} is not a digits-FID feature file (metadata format "
            f"{metadata.get('format')!r}, expected {DIGITS_FID_FORMAT!r})"
        )
    tensors = load_file(str(file))
    backbone = json.loads(metadata["backbone"])
    network = DigitsFIDFeatures(
        input_mean=float(tensors["input_mean"]),
        input_std=float(tensors["input_std"]),
        in_channels=int(backbone["in_channels"]),
        width=int(backbone["width"]),
        feature_dim=int(backbone["feature_dim"]),
    )
    prefix = "backbone."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    network.backbone.load_state_dict(state, strict=True)
    network.input_mean.copy_(tensors["input_mean"])
    network.input_std.copy_(tensors["input_std"])
    network.metadata = metadata
    return network.requires_grad_(False).eval()


def digits_real_images() -> Tensor:
    """All 1,797 scikit-learn digits, ``(1797, 1, 8, 8)`` float32 in [-1, 1].

    The same mapping as ``DigitsDataModule(normalize="symmetric", image_size=8)``:
    :math:`x = 2 \\cdot \\mathrm{pixel} / 16 - 1`.
    """
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images * 2.0 - 1.0


def digits_fid_metric(
    features: DigitsFIDFeatures | None = None, device: torch.device | str | None = None
) -> FrechetInceptionDistance:
    """A torchmetrics FID on the digits-FID features with the real statistics of ALL digits.

    The 1,797 real digits go through the network in one batch, so every caller (the callback,
    :func:`digits_fid`) holds the very same real sums. ``reset()`` keeps them.
    """
    network = digits_fid_features() if features is None else features
    metric = fid_metric(network, network.num_features)
    if device is not None:
        metric = metric.to(device)
    real = digits_real_images().to(metric.real_features_sum.device)
    metric.update(real, real=True)
    return metric


def check_digits_samples(samples: Tensor, name: str = "samples") -> None:
    """Raise ValueError unless ``samples`` is a float ``(N, 1, 8, 8)`` batch, N >= 2."""
    if (
        not isinstance(samples, Tensor)
        or samples.ndim != 4
        or tuple(samples.shape[1:]) != (1, 8, 8)
        or samples.shape[0] < 2
        or not samples.is_floating_point()
    ):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(
            f"digits-FID {name} must be a float (N, 1, 8, 8) tensor in [-1, 1] with N >= 2, "
            f"got {shape}"
        )


@torch.no_grad()
def digits_fid(samples: Tensor, batch_size: int = 500) -> float:
    """digits-FID of generated ``samples`` in [-1, 1] against all 1,797 real digits.

    The samples are clamped to [-1, 1] and fed in chunks of ``batch_size`` (the chunking only
    changes the last float64 digits of the sums). The reference number uses
    :data:`DIGITS_FID_NUM_SAMPLES` samples; fewer inflate it (FID is biased upwards in 1/N).
    Equals :class:`~lightning_losses.callbacks.FIDCallback` ``(feature="digits")`` on the same
    samples with the same ``batch_size``.

    Args:
        samples: ``(N, 1, 8, 8)`` generated images, N >= 2.
        batch_size: images per feature-network call.

    Raises:
        ValueError: for a wrong shape, non-finite values or ``batch_size`` < 1.
    """
    check_digits_samples(samples)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("digits-FID samples contain NaN or inf values")
    metric = digits_fid_metric(device=samples.device)
    for chunk in samples.split(int(batch_size)):
        metric.update(chunk.float().clamp(-1.0, 1.0), real=False)
    return float(metric.compute())
