"""Distribution-shifted test sets (2/2): the released ones, in their on-disk formats.

- :class:`CIFAR10CDataset`: the CIFAR-10-C files (Hendrycks & Dietterich) as released, and
  :func:`cifar10c_test_sets` for every corruption and severity.
- :class:`ImageNetVariantFolder`: ImageNet-A / -R / -Sketch / -V2 folders with labels in the
  1000-class ImageNet index space, and :func:`restrict_logits` for the 200-class variants.

Synthetic corruptions are in :mod:`lightning_losses.datamodules.shifts`. torchvision and PIL are
imported inside the functions that read files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_losses.datamodules.base import item_index

__all__ = [
    "CIFAR10C_CORRUPTIONS",
    "CIFAR10CDataset",
    "ImageNetVariantFolder",
    "cifar10c_test_sets",
    "restrict_logits",
]

SEVERITIES = (1, 2, 3, 4, 5)


def _check_severity(severity: Any) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


def _load_npy(path: str) -> np.ndarray:
    """``np.load(path)`` memory-mapped, without pickles; a corrupt file's error names it."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"{path!r} is not a readable .npy array file ({error}); re-download or re-extract it"
        ) from error


# --------------------------------------------------------------------------------------------
# CIFAR-10-C
# --------------------------------------------------------------------------------------------

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
        labels = _load_npy(labels_path)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{labels_path!r} must hold integer class labels, got dtype {labels.dtype}"
            )
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
        targets = np.asarray(labels[rows])
        if targets.size and (targets.min() < 0 or targets.max() > 9):
            raise ValueError(
                f"{labels_path!r} must hold CIFAR-10 labels in [0, 9], got values in "
                f"[{targets.min()}, {targets.max()}] for severity {severity}"
            )
        self.targets: list[int] = [int(t) for t in targets]
        self._images: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        return _load_npy(self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def __len__(self) -> int:
        return self.per_severity

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        index = item_index(index, len(self))
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
