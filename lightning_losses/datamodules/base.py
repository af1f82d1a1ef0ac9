"""Common base of the classification data modules, and small data-set helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from lightning_losses.checks import check_int
from lightning_losses.datamodules.sampling import EpochSeededRandomSampler

__all__ = [
    "ClassificationDataModule",
    "IndexedDataset",
    "TransformedSubset",
    "WrapperDataModule",
    "item_index",
    "stratified_split",
]


def item_index(index: int, n: int) -> int:
    """``index`` in ``[0, n)``, a negative one counted from the end; IndexError otherwise."""
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} items")
    return index


def stratified_split(
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    holdout: int,
    seed: int,
    name: str = "holdout",
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(targets))`` into (kept, held-out) index arrays, stratified by label.

    The same ``(targets, holdout, seed)`` always gives the same split. Both arrays are sorted.

    Args:
        targets: integer class label of every item.
        holdout: number of items in the held-out part (``0 <= holdout < len(targets)``); it must
            be at least the number of classes present so every class can be represented.
        seed: random state of the split.
        name: how the caller calls ``holdout``, for error messages.
    """
    labels = np.asarray(targets)
    n = len(labels)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < n:
        raise ValueError(f"{name} must be an int in [0, {n}), got {holdout!r}")
    indices = np.arange(n)
    if holdout == 0:
        return indices, indices[:0]
    num_present = len(np.unique(labels))
    if holdout < num_present or n - holdout < num_present:
        raise ValueError(
            f"a stratified split of {n} items over {num_present} classes needs between "
            f"{num_present} and {n - num_present} held-out items: {name} must be in that "
            f"range, got {holdout}"
        )
    kept, held = train_test_split(indices, test_size=holdout, stratify=labels, random_state=seed)
    return np.sort(kept), np.sort(held)


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the input (the label is unchanged).

    Lets one data set loaded once (with no transform) feed a training split with augmentation and
    a validation split with the evaluation transform.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | np.ndarray,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[self.indices[index]]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class IndexedDataset(Dataset):
    """``(input, label, index)``: the items of ``dataset`` with their position in it.

    For per-sample state kept by a model, e.g. the pruning weights of the truncated Lq loss
    (:class:`~lightning_losses.modules.OPLClassifier` with ``base_loss="truncated"``). The index
    is an int64 scalar tensor, so default collation gives a (B,) int64 tensor.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        x, y, *rest = self.dataset[index]
        return (x, y, torch.tensor(index, dtype=torch.int64), *rest)


class ClassificationDataModule(L.LightningDataModule):
    """Base of the image-classification data modules.

    Subclasses implement :attr:`num_classes`, :attr:`image_shape` (both usable before
    :meth:`setup`, e.g. by ``LightningCLI.link_arguments``) and :meth:`setup`, which fills
    ``train_dataset``, ``val_dataset`` and ``test_dataset``. Items are
    ``(float32 image (C, H, W), int64 label)``.

    The training loader shuffles with :class:`EpochSeededRandomSampler` seeded with ``seed``; the
    validation and test loaders keep the data-set order. With ``return_indices`` the training
    loader yields ``(x, y, index)`` batches (:class:`IndexedDataset`; ``index`` is the position
    in ``train_dataset``), for losses with per-sample state such as the truncated Lq loss.

    Args:
        batch_size: items per batch.
        num_workers: loader worker processes (workers persist across epochs when > 0).
        seed: seed of the splits and of the training order.
        return_indices: training batches carry sample indices as a third element.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        return_indices: bool = False,
    ) -> None:
        super().__init__()
        check_int(batch_size, "batch_size", minimum=1)
        check_int(num_workers, "num_workers", minimum=0)
        check_int(seed, "seed")
        if not isinstance(return_indices, bool):
            raise ValueError(f"return_indices must be a bool, got {return_indices!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.return_indices = return_indices
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (available before :meth:`setup`)."""
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image (available before :meth:`setup`)."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{split}_dataset is not set: call setup() first "
                f"(setup('fit') for train/val, setup('test') for test)"
            )
        # No ``shuffle=`` argument on purpose: Lightning reads a saved ``shuffle`` keyword before
        # the sampler's type when it decides whether a DDP replacement sampler shuffles.
        kwargs: dict[str, Any] = {}
        if shuffle:
            kwargs["sampler"] = EpochSeededRandomSampler(dataset, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (order fixed by ``seed`` and the epoch).

        Items are ``(x, y)``, or ``(x, y, index)`` with ``return_indices``.
        """
        dataset = self.train_dataset
        if self.return_indices and dataset is not None:
            dataset = IndexedDataset(dataset)
        return self._loader(dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation loader, in data-set order."""
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test loader, in data-set order."""
        return self._loader(self.test_dataset, "test", shuffle=False)


class WrapperDataModule:
    """Mixin of the data modules that wrap another one: checks it, keeps it as ``datamodule``,
    and hands on its :attr:`num_classes`, :attr:`image_shape` and :meth:`prepare_data`."""

    datamodule: L.LightningDataModule

    def _wrap(self, datamodule: L.LightningDataModule) -> None:
        if not isinstance(datamodule, L.LightningDataModule):
            raise ValueError(
                f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}"
            )
        self.datamodule = datamodule

    @property
    def num_classes(self) -> int:
        """Number of classes of the wrapped module."""
        return self.datamodule.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Image shape of the wrapped module."""
        return self.datamodule.image_shape

    def prepare_data(self) -> None:
        """Delegated to the wrapped module."""
        self.datamodule.prepare_data()
