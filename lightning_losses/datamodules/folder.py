"""ImageNet-style class-folder data sets (``root/<split>/<class>/<image>``)."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset

from lightning_losses.checks import check_float, check_int
from lightning_losses.datamodules.base import (
    ClassificationDataModule,
    TransformedSubset,
    stratified_split,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _list_classes(directory: str) -> list[str]:
    """Sorted names of the sub-folders of ``directory`` (the order ``ImageFolder`` uses)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"image folder {directory!r} does not exist: expected one sub-folder per class"
        )
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"image folder {directory!r} has no class sub-folders")
    return classes


class ImageFolderDataModule(ClassificationDataModule):
    """``torchvision.datasets.ImageFolder`` splits with the usual ImageNet transforms.

    - train: ``root/train_dir`` with ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip``;
      with ``val_from_train > 0`` that fraction of it (stratified, seeded) is held out instead
      and becomes the validation split (with the evaluation transform).
    - val: ``root/val_dir`` (unless ``val_from_train > 0``).
    - test: ``root/test_dir``, or ``root/val_dir`` when ``test_dir`` is None.

    Evaluation transform: ``Resize(int(image_size * 256 / 224))`` + ``CenterCrop(image_size)``.
    Both end with ``ToTensor`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.

    :attr:`classes` and :attr:`num_classes` come from listing the class sub-folders of
    ``root/train_dir`` (so they are known before :meth:`setup`); every other split must have the
    same class folders, otherwise the label indices would silently disagree.

    Args:
        root: folder that holds the split folders.
        train_dir: training split folder, relative to ``root``.
        val_dir: validation split folder, relative to ``root``.
        test_dir: test split folder, relative to ``root`` (None: use ``val_dir``).
        image_size: side of the square crops.
        batch_size: items per batch.
        num_workers: loader worker processes.
        seed: seed of the ``val_from_train`` split and of the training order.
        val_from_train: fraction of ``train_dir`` held out for validation, in [0, 1).
        return_indices: training batches are ``(x, y, index)`` (for per-sample state such as
            the truncated Lq loss's pruning weights).
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
        val_from_train: float = 0.0,
        return_indices: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, return_indices)
        check_int(image_size, "image_size", minimum=1)
        check_float(val_from_train, "val_from_train", minimum=0.0, maximum=1.0, strict_maximum=True)
        self.save_hyperparameters()
        self.root = str(root)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.image_size = image_size
        self.val_from_train = val_from_train
        self._classes: list[str] | None = None
        self.train_indices: list[int] | None = None
        self.val_indices: list[int] | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, sorted (index = label)."""
        if self._classes is None:
            self._classes = _list_classes(os.path.join(self.root, self.train_dir))
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def train_transform(self) -> Any:
        """``RandomResizedCrop`` + flip + ``ToTensor`` + ``Normalize``."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def eval_transform(self) -> Any:
        """``Resize(image_size * 256 / 224)`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize``."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(int(self.image_size * 256 / 224)),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _folder(self, subdir: str, transform: Any = None) -> Dataset:
        from torchvision.datasets import ImageFolder

        directory = os.path.join(self.root, subdir)
        found = _list_classes(directory)
        if found != self.classes:
            missing = sorted(set(self.classes) - set(found))
            extra = sorted(set(found) - set(self.classes))
            raise ValueError(
                f"class folders of {directory!r} differ from those of the training split "
                f"{os.path.join(self.root, self.train_dir)!r} (missing: {missing}, extra: "
                f"{extra}); every split needs the same class folders"
            )
        return ImageFolder(directory, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits needed by ``stage`` (all of them when ``stage`` is None)."""
        need_fit = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict")
        if need_fit and self.train_dataset is None:
            if self.val_from_train > 0:
                full = self._folder(self.train_dir)
                holdout = int(round(self.val_from_train * len(full)))
                kept, held = stratified_split(
                    full.targets, holdout, self.seed, name="round(val_from_train * N)"
                )
                self.train_indices = kept.tolist()
                self.val_indices = held.tolist()
                self.train_dataset = TransformedSubset(full, kept, self.train_transform())
                self.val_dataset = TransformedSubset(full, held, self.eval_transform())
            else:
                self.train_dataset = self._folder(self.train_dir, self.train_transform())
                self.val_dataset = self._folder(self.val_dir, self.eval_transform())
        if need_test and self.test_dataset is None:
            test_dir = self.val_dir if self.test_dir is None else self.test_dir
            self.test_dataset = self._folder(test_dir, self.eval_transform())
