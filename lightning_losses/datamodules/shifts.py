"""Distribution-shifted test sets: synthetic corruptions, CIFAR-10-C and the ImageNet variants.

- :data:`CORRUPTIONS`: named corruptions of one normalised image tensor at a severity 1..5, pure
  functions of ``(image, severity, generator)`` that work for 1- or 3-channel images of any size
  (8x8 digits included): their strengths are relative to the image's own range and size.
- :class:`CorruptedDataset` / :func:`corrupted_test_sets`: deterministic corrupted copies of a
  test set (e.g. of the in-distribution test split of a data module).
- :class:`CIFAR10CDataset`: the CIFAR-10-C files (Hendrycks & Dietterich) as released.
- :class:`ImageNetVariantFolder`: ImageNet-A / -R / -Sketch / -V2 folders with labels in the
  1000-class ImageNet index space, and :func:`restrict_logits` for the 200-class variants.

torchvision and PIL are imported inside the functions that read files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_losses.datamodules.views import mix_seed

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "CORRUPTIONS",
    "CIFAR10CDataset",
    "CorruptedDataset",
    "ImageNetVariantFolder",
    "cifar10c_test_sets",
    "corrupted_test_sets",
    "restrict_logits",
]

SEVERITIES = (1, 2, 3, 4, 5)

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


def _check_severity(severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


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
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
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


# --------------------------------------------------------------------------------------------
# CIFAR-10-C

#: The 19 corruptions of the CIFAR-10-C release (15 benchmark ones + 4 extra).
CIFAR10C_CORRUPTIONS = (
    "brightness",
    "contrast",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_blur",
    "gaussian_noise",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
)


def _cifar10_eval_transform() -> Callable[[Any], Tensor]:
    from torchvision import transforms as T

    from lightning_losses.datamodules.cifar import CIFAR10DataModule

    return T.Compose([T.ToTensor(), T.Normalize(CIFAR10DataModule.mean, CIFAR10DataModule.std)])


class CIFAR10CDataset(Dataset):
    """One corruption at one severity of CIFAR-10-C, in its released on-disk format.

    ``root`` holds ``<corruption>.npy``, a uint8 array ``(5 n, 32, 32, 3)`` (n = 10,000 in the
    release: the test set at severity 1, then 2, ..., 5) and ``labels.npy`` ``(5 n,)``. Severity
    ``s`` is rows ``[(s - 1) n, s n)`` with ``n = len / 5``. Files are read with
    ``allow_pickle=False`` and memory-mapped lazily (after pickling to a loader worker too), so
    only the rows used are read.

    Items are ``(transform(PIL image), int label)``; the default transform is CIFAR-10's test
    transform, ``ToTensor`` + ``Normalize`` with :class:`CIFAR10DataModule`'s mean / std, so the
    items match the in-distribution test set of that module. Pass ``transform=lambda x: x`` (or
    your own) to change it.

    Attributes:
        targets: the int labels of the selected rows.

    Args:
        root: folder of the extracted ``CIFAR-10-C`` release.
        corruption: file stem, e.g. ``"gaussian_noise"`` (see :data:`CIFAR10C_CORRUPTIONS`).
        severity: 1..5.
        transform: applied to the PIL image (None: CIFAR-10 normalisation).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        corruption: str,
        severity: int,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        _check_severity(severity)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"CIFAR-10-C folder {self.root!r} does not exist")
        available = sorted(
            name[:-4]
            for name in os.listdir(self.root)
            if name.endswith(".npy") and name != "labels.npy"
        )
        if not isinstance(corruption, str) or corruption not in available:
            raise ValueError(
                f"corruption must be one of the corruptions found in {self.root!r}: {available}, "
                f"got {corruption!r}"
            )
        labels_path = os.path.join(self.root, "labels.npy")
        if not os.path.isfile(labels_path):
            raise FileNotFoundError(f"{labels_path!r} is missing from the CIFAR-10-C folder")
        self.corruption = corruption
        self.severity = severity
        self.path = os.path.join(self.root, f"{corruption}.npy")
        self.transform = _cifar10_eval_transform() if transform is None else transform

        images = self._load()
        labels = np.load(labels_path, allow_pickle=False, mmap_mode="r")
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"{self.path!r} must hold a uint8 array of shape (N, 32, 32, 3), got "
                f"{images.dtype} {images.shape}"
            )
        total = images.shape[0]
        if total % 5 or labels.shape != (total,):
            raise ValueError(
                f"{self.path!r} must stack 5 severities of equal size and labels.npy must have "
                f"one label per row: got {total} images and labels of shape {labels.shape}"
            )
        self.per_severity = total // 5
        self.start = (severity - 1) * self.per_severity
        rows = slice(self.start, self.start + self.per_severity)
        self.targets: list[int] = [int(t) for t in np.asarray(labels[rows])]
        self._images: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False, mmap_mode="r")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return self.per_severity

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        if self._images is None:
            self._images = self._load()
        image = Image.fromarray(np.array(self._images[self.start + index]))
        return self.transform(image), self.targets[index]


def cifar10c_test_sets(
    root: str | os.PathLike[str],
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    transform: Callable[[Any], Any] | None = None,
) -> dict[str, Dataset]:
    """CIFAR-10-C sets ``{"cifar10c-<corruption>-<severity>": CIFAR10CDataset}``, e.g. to pass
    as ``ood_datasets`` to :class:`~lightning_losses.datamodules.calibration.CalibrationDataModule`.

    Args:
        root: folder of the extracted release.
        corruptions: file stems (None: every ``<name>.npy`` found in ``root``, sorted).
        severities: severities in 1..5.
        transform: see :class:`CIFAR10CDataset`.
    """
    root = os.fspath(root)
    if corruptions is None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR-10-C folder {root!r} does not exist")
        corruptions = sorted(
            n[:-4] for n in os.listdir(root) if n.endswith(".npy") and n != "labels.npy"
        )
    return {
        f"cifar10c-{name}-{severity}": CIFAR10CDataset(root, name, severity, transform)
        for name in corruptions
        for severity in severities
    }


# --------------------------------------------------------------------------------------------
# ImageNet variants

_VARIANTS = ("A", "R", "S", "V2")


def _read_wnids(wnids: Sequence[str] | str | os.PathLike[str]) -> list[str]:
    """The ImageNet class order: a list, a text file or an ImageNet train folder."""
    if isinstance(wnids, str | os.PathLike):
        path = os.fspath(wnids)
        if os.path.isdir(path):
            names = sorted(e.name for e in os.scandir(path) if e.is_dir())
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                names = [line.split()[0] for line in handle if line.strip()]
        else:
            raise ValueError(
                f"wnids must be a list of WordNet ids, a text file with one per line or an "
                f"ImageNet train folder, got the path {path!r}, which does not exist"
            )
    else:
        names = [str(n) for n in wnids]
    if not names:
        raise ValueError("wnids must name at least one class, got none")
    if len(set(names)) != len(names):
        raise ValueError("wnids must not repeat a WordNet id")
    return names


def _imagenet_eval_transform(image_size: int) -> Callable[[Any], Tensor]:
    from torchvision import transforms as T

    from lightning_losses.datamodules.folder import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose(
        [
            T.Resize(int(image_size * 256 / 224)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageNetVariantFolder(Dataset):
    """ImageNet-A, -R, -Sketch or -V2 with labels in ImageNet's 1000-class index space.

    The folders as released:

    - ``"A"`` (ImageNet-A) and ``"R"`` (ImageNet-R): 200 class folders named by WordNet id
      (``n01443537``, ...): only 200 of the 1000 classes occur;
    - ``"S"`` (ImageNet-Sketch): 1000 WordNet-id folders;
    - ``"V2"`` (ImageNetV2): folders ``0`` .. ``999`` named by the ImageNet class index itself
      (sorted as strings by ``ImageFolder``, so they are mapped back to ``int(name)`` here).

    For WordNet-id folders the ImageNet index of a folder is its position in ``wnids``: a list,
    the path of a text file with one WordNet id per line (only the first word of a line is
    read, so ``LOC_synset_mapping.txt`` works), or the path of an ImageNet train folder (its
    sorted class folder names, the order torchvision's ``ImageFolder`` and the pretrained
    classifiers use). Nothing is downloaded. For ``"S"``, ``wnids=None`` uses the variant's own
    sorted folder names (all 1000 classes are present); ``"A"`` / ``"R"`` need ``wnids``.

    Evaluating a 1000-way classifier on A / R: restrict its logits to :attr:`class_subset`, as
    the authors of these benchmarks (and of the CA calibrator) do, e.g. with
    :func:`restrict_logits` (``-inf`` elsewhere, labels keep their ImageNet index) or
    ``logits[:, class_subset]`` with labels mapped through ``class_subset.index``.

    Attributes:
        class_subset: sorted ImageNet indices present in the folder (200 for A / R).
        folder_to_index: class folder name -> ImageNet index.
        targets: the ImageNet index of every image.
        num_classes: size of the index space (``len(wnids)``, 1000 for V2).

    Args:
        root: the variant's folder (that holds the class folders).
        variant: ``"A"``, ``"R"``, ``"S"`` or ``"V2"``.
        wnids: ImageNet class order (see above; ignored for V2).
        transform: applied to the RGB PIL image (None: ``Resize(image_size * 256 / 224)`` +
            ``CenterCrop(image_size)`` + ``ToTensor`` + ImageNet ``Normalize``).
        image_size: crop side of the default transform.
        num_classes: index space of V2 folders (1000).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        variant: Literal["A", "R", "S", "V2"],
        wnids: Sequence[str] | str | os.PathLike[str] | None = None,
        transform: Callable[[Any], Any] | None = None,
        image_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        from torchvision.datasets import ImageFolder

        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageNet-{variant} folder {self.root!r} does not exist")
        self.variant = variant
        self.transform = _imagenet_eval_transform(image_size) if transform is None else transform
        self.folder = ImageFolder(self.root)
        folders: list[str] = self.folder.classes

        if variant == "V2":
            bad = [f for f in folders if not f.isdigit() or not 0 <= int(f) < num_classes]
            if bad:
                raise ValueError(
                    f"ImageNetV2 class folders must be named by an int in [0, {num_classes}), "
                    f"found {bad[:5]} in {self.root!r}"
                )
            self.folder_to_index = {f: int(f) for f in folders}
            self.num_classes = num_classes
        else:
            if wnids is None:
                if variant != "S":
                    raise ValueError(
                        f"wnids is required for ImageNet-{variant} (200 of the 1000 classes): "
                        "pass the 1000 WordNet ids in ImageNet order, a text file of them or "
                        "an ImageNet train folder"
                    )
                wnids = folders
            order = _read_wnids(wnids)
            position = {w: i for i, w in enumerate(order)}
            unknown = [f for f in folders if f not in position]
            if unknown:
                raise ValueError(
                    f"class folders of {self.root!r} are not in wnids ({len(order)} ids): "
                    f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                )
            self.folder_to_index = {f: position[f] for f in folders}
            self.num_classes = len(order)
        self.class_subset: list[int] = sorted(self.folder_to_index.values())
        self._index_of_class = [self.folder_to_index[f] for f in folders]
        self.targets: list[int] = [self._index_of_class[t] for t in self.folder.targets]

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, folder_target = self.folder[index]
        return self.transform(image), self._index_of_class[folder_target]


def restrict_logits(logits: Tensor, class_subset: Sequence[int] | Tensor) -> Tensor:
    """Set the logits of the classes outside ``class_subset`` to ``-inf`` (shape unchanged).

    Softmax, argmax and cross-entropy then behave as over the subset only (e.g. the 200 classes
    of ImageNet-A / -R) while labels keep their full-space index. Entropy-style sums over all
    classes must treat ``0 * -inf`` (use ``torch.special.xlogy`` or slice instead).

    Args:
        logits: ``(..., K)`` logits.
        class_subset: indices in ``[0, K)`` to keep.
    """
    keep = torch.as_tensor(class_subset, dtype=torch.long, device=logits.device)
    k = logits.shape[-1]
    if keep.ndim != 1 or keep.numel() == 0 or keep.min() < 0 or keep.max() >= k:
        raise ValueError(f"class_subset must be a non-empty list of indices in [0, {k})")
    mask = torch.ones(k, dtype=torch.bool, device=logits.device)
    mask[keep] = False
    return logits.masked_fill(mask, float("-inf"))
