"""Transformed views of every image, for the correctness-aware (CA) calibrator.

A frozen classifier sees an image *and* a few transformed copies of it ("views"); the calibrator
reads how the classifier's top-k probabilities move across the views. :class:`ViewsDataset` wraps
any ``(image, label)`` data set and returns ``(image, views, label)``, with views that are a pure
function of ``(seed, index, view)``.

torchvision is imported only inside :func:`default_view_transforms`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_losses.checks import check_int
from lightning_losses.datamodules.base import item_index

__all__ = [
    "Denormalized",
    "MinMaxRescaled",
    "ViewsDataset",
    "default_view_transforms",
    "mix_seed",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (e.g. ``(seed, index, view)``).

    Uses :class:`numpy.random.SeedSequence`, so nearby tuples give unrelated seeds. Negative
    integers are taken modulo ``2**64``. A pure function of its arguments.
    """
    entropy = [int(p) & _MASK64 for p in parts]
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & ((1 << 63) - 1)


class MinMaxRescaled:
    """Apply ``transform`` to the image rescaled to [0, 1] by its own min / max, then map back.

    Colour transforms such as ``ColorJitter`` expect images in [0, 1] (they clamp to it), but the
    data modules hand out *normalised* tensors, which can be negative. This wrapper maps the whole
    image (all channels with one affine map, so colours keep their relations) to [0, 1], applies
    the transform and applies the inverse map. A fill value 0 of a geometric transform therefore
    becomes the image's minimum (the background of a digit). A constant image is returned as is
    after the transform of a zero image, shifted back.
    """

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Tensor) -> Tensor:
        low = image.amin()
        scale = (image.amax() - low).clamp_min(1e-12)
        return self.transform((image - low) / scale) * scale + low

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class Denormalized:
    """Apply ``transform`` to ``image * std + mean`` (the raw [0, 1] image), then normalise back.

    Exact when the data module normalised with ``(x - mean) / std``; ``mean`` and ``std`` are
    scalars or one value per channel.
    """

    def __init__(
        self,
        transform: Callable[[Tensor], Tensor],
        mean: float | Sequence[float],
        std: float | Sequence[float],
    ) -> None:
        self.transform = transform
        self.mean = _as_channel_vector("mean", mean)
        self.std = _as_channel_vector("std", std)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be > 0 in every channel, got {std!r}")

    def __call__(self, image: Tensor) -> Tensor:
        mean = self.mean.to(image.device, image.dtype)
        std = self.std.to(image.device, image.dtype)
        return (self.transform(image * std + mean) - mean) / std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.transform!r}, mean={self.mean.flatten().tolist()}, "
            f"std={self.std.flatten().tolist()})"
        )


def _as_channel_vector(name: str, value: float | Sequence[float]) -> Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [float(value)]
    elif (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    ):
        values = [float(v) for v in value]
    else:
        raise ValueError(f"{name} must be a float or a non-empty sequence of floats, got {value!r}")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def default_view_transforms(
    num_channels: int,
    image_size: int,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> list[Callable[[Tensor], Tensor]]:
    """The default views of the CA calibrator, for normalised float tensors ``(C, H, W)``.

    RGB (``num_channels == 3``), the paper's three views:

    1. rotation by an angle drawn uniformly from [-30, -10] or [10, 30] degrees (never close to
       the identity), bilinear, corners filled with black;
    2. greyscale (``Grayscale(num_output_channels=3)``, deterministic);
    3. colour jitter ``ColorJitter(0.4, 0.4, 0.4, 0.1)``.

    Greyscale (``num_channels == 1``, e.g. 8x8 to 32x32 digits), substitutes for the colour views:

    1. rotation by an angle in [-20, -8] or [8, 20] degrees, corners filled with the background;
    2. Gaussian blur (kernel 3 up to 32 pixels, ``2 * (image_size // 32) + 1`` above, sigma in
       [0.6, 1.2] scaled likewise);
    3. ``RandomAffine``: a shift of up to 1/8 of the side and a scale in [0.85, 1.15].

    The colour and geometric transforms expect raw images in [0, 1]. With ``mean`` and ``std``
    (the normalisation the data module applied) every transform runs on the exactly
    un-normalised image (:class:`Denormalized`); without them, on the image min-max rescaled to
    [0, 1] (:class:`MinMaxRescaled`), which keeps every view in the input's value range.

    Args:
        num_channels: 1 or 3.
        image_size: side of the (square) images, in pixels.
        mean: normalisation mean, a scalar or one per channel (None: min-max rescaling).
        std: normalisation std, a scalar or one per channel (None: min-max rescaling).

    Returns:
        A list of callables, one per view, each mapping a ``(C, H, W)`` tensor to one of the same
        shape and drawing its randomness from torch's global RNG.
    """
    from torchvision.transforms import v2

    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
    check_int(image_size, "image_size", minimum=1)
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (or both None)")

    def wrap(transform: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if mean is None or std is None:
            return MinMaxRescaled(transform)
        return Denormalized(transform, mean, std)

    bilinear = v2.InterpolationMode.BILINEAR
    if num_channels == 3:
        rotation = v2.RandomChoice(
            [
                v2.RandomRotation((-30.0, -10.0), interpolation=bilinear),
                v2.RandomRotation((10.0, 30.0), interpolation=bilinear),
            ]
        )
        return [
            wrap(rotation),
            wrap(v2.Grayscale(num_output_channels=3)),
            wrap(v2.ColorJitter(0.4, 0.4, 0.4, 0.1)),
        ]
    rotation = v2.RandomChoice(
        [
            v2.RandomRotation((-20.0, -8.0), interpolation=bilinear),
            v2.RandomRotation((8.0, 20.0), interpolation=bilinear),
        ]
    )
    factor = max(1, image_size // 32)
    kernel = 3 if image_size <= 32 else 2 * factor + 1
    blur = v2.GaussianBlur(kernel, sigma=(0.6 * factor, 1.2 * factor))
    affine = v2.RandomAffine(
        degrees=0.0, translate=(0.125, 0.125), scale=(0.85, 1.15), interpolation=bilinear
    )
    return [wrap(rotation), wrap(blur), wrap(affine)]


class ViewsDataset(Dataset):
    """Adds transformed views to every item: ``(image, label)`` -> ``(image, views, label)``.

    ``views`` is a ``(V, C, H, W)`` tensor, view ``j`` being ``transforms[j](image)``. Each
    transform call runs inside :func:`torch.random.fork_rng` with torch's CPU generator seeded by
    :func:`mix_seed` ``(seed, index, j)``, so item ``index`` always gets the same views, whatever
    the access order, the number of loader workers or the global RNG state (which is left
    untouched). torchvision's v1 and v2 transforms draw from that generator. Transforms that use
    Python's ``random`` or NumPy's RNG are not made deterministic. Not thread-safe (loader workers
    are processes, which is fine).

    Args:
        dataset: a data set of ``(image tensor (C, H, W), label)``.
        transforms: one callable per view, each ``(C, H, W) -> (C, H, W)``; None builds
            :func:`default_view_transforms` from the shape of ``dataset[0]`` (min-max rescaled).
        seed: seed of the views.
    """

    def __init__(
        self,
        dataset: Dataset,
        transforms: Sequence[Callable[[Tensor], Tensor]] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if transforms is None:
            image = dataset[0][0]
            if not isinstance(image, Tensor) or image.ndim != 3:
                raise ValueError(
                    "transforms=None needs items whose image is a (C, H, W) tensor to pick the "
                    f"default views, got {type(image).__name__}"
                )
            transforms = default_view_transforms(int(image.shape[0]), int(image.shape[-1]))
        transforms = list(transforms)
        if not transforms or not all(callable(t) for t in transforms):
            raise ValueError(
                f"transforms must be a non-empty sequence of callables, got {transforms!r}"
            )
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed

    @property
    def num_views(self) -> int:
        """Number of views ``V`` per item."""
        return len(self.transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def views(self, image: Tensor, index: int) -> Tensor:
        """The ``(V, C, H, W)`` views of ``image`` as item ``index`` of this data set."""
        if not isinstance(image, Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"ViewsDataset needs (C, H, W) image tensors, got {shape}")
        out = []
        for j, transform in enumerate(self.transforms):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed(self.seed, index, j))
                view = transform(image)
            if not isinstance(view, Tensor) or view.shape != image.shape:
                got = tuple(view.shape) if isinstance(view, Tensor) else type(view).__name__
                raise ValueError(
                    f"view transform {j} ({transform!r}) must return a tensor of the input's "
                    f"shape {tuple(image.shape)}, got {got}"
                )
            out.append(view.to(image.dtype))
        return torch.stack(out)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Any]:
        index = item_index(index, len(self))
        image, label = self.dataset[index]
        return image, self.views(image, index), label
