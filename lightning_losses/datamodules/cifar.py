"""CIFAR-10 / CIFAR-100 with the 45k / 5k train / val split of the official training set."""

from __future__ import annotations

import os
from typing import Any, Literal

from torch.utils.data import Dataset

from lightning_losses.checks import check_int
from lightning_losses.datamodules.base import (
    ClassificationDataModule,
    TransformedSubset,
    stratified_split,
)

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule"]


class CIFARDataModule(ClassificationDataModule):
    """Shared base of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.

    - train: ``val_size`` images of the official training set are held out (stratified by class,
      a pure function of ``seed``); the rest is augmented with ``RandomCrop(32, padding=4)`` and
      ``RandomHorizontalFlip`` (when ``augment``), then ``ToTensor`` + ``Normalize``.
    - val: the held-out images with the *evaluation* transform (``ToTensor`` + ``Normalize``).
      With ``val_size=0`` the whole training set is used for training and validation runs on
      the official test set.
    - test: the official test set, evaluation transform.

    Files are read with ``torchvision.datasets`` from ``root`` (the folder that contains
    ``cifar-10-batches-py`` / ``cifar-100-python``); they are downloaded only by
    :meth:`prepare_data` and only when ``download=True``.

    Args:
        root: data folder.
        download: download the archive in :meth:`prepare_data` if it is missing.
        batch_size: items per batch.
        num_workers: loader worker processes.
        seed: seed of the train / val split and of the training order.
        val_size: number of training images held out for validation, stratified by class
            (5,000 in the OPL recipe; 0 trains on all 50k and validates on the test set).
        augment: apply the crop / flip augmentation to the training split.
        normalize: ``"standard"`` (per-channel mean / std of the training set, for classifiers)
            or ``"symmetric"`` (``2x - 1``, images in [-1, 1], for diffusion models).
        return_indices: training batches are ``(x, y, index)`` (for per-sample state such as
            the truncated Lq loss's pruning weights).
    """

    _name: str = ""
    _folder: str = ""
    _torchvision_class: str = ""  # the torchvision.datasets class
    _num_classes: int = 0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        normalize: Literal["standard", "symmetric"] = "standard",
        return_indices: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, return_indices)
        check_int(val_size, "val_size", minimum=0)
        if normalize not in ("standard", "symmetric"):
            raise ValueError(f'normalize must be "standard" or "symmetric", got {normalize!r}')
        self.save_hyperparameters()
        self.root = str(root)
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.normalize = normalize
        self.train_indices: list[int] | None = None
        self.val_indices: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)

    def _dataset_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self._torchvision_class)

    def _normalization(self) -> Any:
        from torchvision import transforms as T

        if self.normalize == "symmetric":
            return T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return T.Normalize(self.mean, self.std)

    def train_transform(self) -> Any:
        """Augmentation + ``ToTensor`` + ``Normalize`` for the training split."""
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.augment:
            steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        steps += [T.ToTensor(), self._normalization()]
        return T.Compose(steps)

    def eval_transform(self) -> Any:
        """``ToTensor`` + ``Normalize`` for validation and test."""
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), self._normalization()])

    def _load(self, train: bool, transform: Any = None) -> Dataset:
        folder = os.path.join(self.root, self._folder)
        try:
            return self._dataset_class()(
                self.root, train=train, transform=transform, download=False
            )
        except RuntimeError as error:
            raise FileNotFoundError(
                f"{self._name} not found or corrupted in {folder!r}. Set download=True to "
                f"download it, or point root to the folder that contains the extracted "
                f"'{self._folder}' directory."
            ) from error

    def prepare_data(self) -> None:
        """Download the archive (only with ``download=True``; rank 0 only under DDP)."""
        if self.download:
            cls = self._dataset_class()
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits needed by ``stage`` (all of them when ``stage`` is None)."""
        need_fit = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict") or (need_fit and self.val_size == 0)
        if need_fit and self.train_dataset is None:
            full = self._load(train=True)
            targets = [int(t) for t in full.targets]
            kept, held = stratified_split(targets, self.val_size, self.seed, name="val_size")
            self.train_indices = kept.tolist()
            self.val_indices = held.tolist()
            self.train_dataset = TransformedSubset(full, kept, self.train_transform())
            if self.val_size > 0:
                self.val_dataset = TransformedSubset(full, held, self.eval_transform())
        if need_test and self.test_dataset is None:
            self.test_dataset = self._load(train=False, transform=self.eval_transform())
        if need_fit and self.val_size == 0:
            self.val_dataset = self.test_dataset


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (10 classes, 50k train / 10k test), see :class:`CIFARDataModule`."""

    _name = "CIFAR-10"
    _torchvision_class = "CIFAR10"
    _folder = "cifar-10-batches-py"
    _num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (100 fine classes, 50k train / 10k test), see :class:`CIFARDataModule`."""

    _name = "CIFAR-100"
    _torchvision_class = "CIFAR100"
    _folder = "cifar-100-python"
    _num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
