"""Symmetric label noise: a tensor function, a data-set wrapper and a data-module wrapper."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_losses.checks import check_float, check_int

__all__ = ["LabelNoiseDataModule", "NoisyLabelDataset", "symmetric_label_noise"]


def _check_rate(rate: float) -> None:
    check_float(rate, "rate", minimum=0.0, maximum=1.0, strict_maximum=True)


def _check_num_classes(num_classes: int) -> None:
    check_int(num_classes, "num_classes", minimum=2)


def _noise_plan(n: int, rate: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Which of ``n`` items are flipped, and by which offset in ``1..num_classes-1``.

    Exactly ``round(rate * n)`` items, drawn uniformly without replacement, are flipped. Returns a
    bool mask and an int64 offset per item (0 where not flipped). A pure function of its inputs.
    """
    _check_rate(rate)
    _check_num_classes(num_classes)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    num_flipped = int(round(rate * n))
    chosen = torch.randperm(n, generator=generator)[:num_flipped]
    offsets = torch.zeros(n, dtype=torch.int64)
    offsets[chosen] = torch.randint(1, num_classes, (num_flipped,), generator=generator)
    return offsets > 0, offsets


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Flip exactly ``round(rate * N)`` labels, each to a uniformly drawn *other* class.

    The flipped items are drawn uniformly without replacement; a flipped label ``y`` becomes
    ``(y + k) % num_classes`` with ``k`` uniform in ``1..num_classes-1``, so it never stays ``y``.
    Deterministic given ``seed``; the input is not modified.

    Args:
        labels: 1-D integer tensor with values in ``[0, num_classes)``.
        rate: fraction of labels to flip, in ``[0, 1)``.
        num_classes: number of classes (>= 2).
        seed: seed of the draw.

    Returns:
        A new int64 tensor of noisy labels, same shape as ``labels``.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError("labels must be a 1-D tensor of class indices")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    _check_num_classes(num_classes)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    _, offsets = _noise_plan(labels.numel(), rate, num_classes, seed)
    labels = labels.to(torch.int64)
    return (labels + offsets.to(labels.device)) % num_classes


class NoisyLabelDataset(Dataset):
    """Wraps a ``(input, label)`` data set and flips a fixed, seeded subset of its labels.

    The flip mask and offsets are drawn once, at construction, from ``(len(dataset), rate,
    num_classes, seed)`` only (labels are not read in advance): item ``i`` returns label
    ``(y + k_i) % num_classes`` where :attr:`flipped` ``[i]`` is true. Over a data set with labels
    ``L`` it gives the same labels as ``symmetric_label_noise(L, rate, num_classes, seed)``.

    Attributes:
        flipped: bool tensor, which items have a flipped label.
        offsets: int64 tensor, the class offset of each item (0 where not flipped).
    """

    def __init__(self, dataset: Dataset, rate: float, num_classes: int, seed: int = 0) -> None:
        self.dataset = dataset
        self.rate = rate
        self.num_classes = num_classes
        self.seed = seed
        self.flipped, self.offsets = _noise_plan(len(dataset), rate, num_classes, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[index]
        if not self.flipped[index]:
            return x, y
        k = int(self.offsets[index])
        if isinstance(y, Tensor):
            return x, (y.to(torch.int64) + k) % self.num_classes
        return x, (int(y) + k) % self.num_classes


class LabelNoiseDataModule(L.LightningDataModule):
    """Adds symmetric label noise to the training split of another data module.

    ``prepare_data``, ``setup``, ``teardown`` and the validation / test / predict loaders are
    delegated; after ``setup`` the wrapped module's ``train_dataset`` is wrapped in a
    :class:`NoisyLabelDataset`, so only training labels are noisy. ``train_dataloader`` builds
    the wrapped module's own training loader (same batch size, sampler, workers) over the noisy
    data set.

    The wrapped module must expose ``num_classes`` and ``image_shape`` and keep its training data
    set in ``train_dataset`` (as every :class:`ClassificationDataModule` does).

    Args:
        datamodule: the clean data module.
        rate: fraction of training labels flipped, in ``[0, 1)``.
        seed: seed of the noise.
    """

    def __init__(self, datamodule: L.LightningDataModule, rate: float, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(datamodule, L.LightningDataModule):
            raise ValueError(
                f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}"
            )
        if not hasattr(datamodule, "num_classes"):
            raise ValueError("datamodule must expose num_classes")
        _check_rate(rate)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.datamodule = datamodule
        self.rate = rate
        self.seed = seed
        self.train_dataset: NoisyLabelDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes of the wrapped module."""
        return self.datamodule.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Image shape of the wrapped module."""
        return self.datamodule.image_shape

    @property
    def val_dataset(self) -> Dataset | None:
        return getattr(self.datamodule, "val_dataset", None)

    @property
    def test_dataset(self) -> Dataset | None:
        return getattr(self.datamodule, "test_dataset", None)

    @property
    def clean_train_dataset(self) -> Dataset | None:
        """The wrapped module's training data set, with its clean labels."""
        return getattr(self.datamodule, "train_dataset", None)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        clean = self.clean_train_dataset
        if clean is None:
            return
        if self.train_dataset is None or self.train_dataset.dataset is not clean:
            self.train_dataset = NoisyLabelDataset(clean, self.rate, self.num_classes, self.seed)

    def teardown(self, stage: str | None = None) -> None:
        self.datamodule.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        """The wrapped module's training loader, over the noisy training set."""
        if self.train_dataset is None:
            raise RuntimeError("LabelNoiseDataModule.train_dataset is not set: call setup() first")
        clean = self.datamodule.train_dataset
        self.datamodule.train_dataset = self.train_dataset
        try:
            return self.datamodule.train_dataloader()
        finally:
            self.datamodule.train_dataset = clean

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
