"""Label noise, symmetric or pair-flip: tensor functions, a data-set and a data-module wrapper."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_losses.checks import check_choice, check_float, check_int
from lightning_losses.datamodules.base import WrapperDataModule

__all__ = [
    "NOISE_TYPES",
    "VAL_NOISE_SEED_OFFSET",
    "LabelNoiseDataModule",
    "NoiseType",
    "NoisyLabelDataset",
    "label_noise",
    "pairflip_label_noise",
    "symmetric_label_noise",
]

NoiseType = Literal["symmetric", "pairflip"]
NOISE_TYPES: tuple[str, ...] = get_args(NoiseType)

#: The validation split's noise is drawn with ``seed + VAL_NOISE_SEED_OFFSET``, so it is not a
#: copy of the training split's draw.
VAL_NOISE_SEED_OFFSET = 1_000_003


def _check_rate(rate: float, name: str = "rate") -> None:
    check_float(rate, name, minimum=0.0, maximum=1.0, strict_maximum=True)


def _check_num_classes(num_classes: int) -> None:
    check_int(num_classes, "num_classes", minimum=2)


def _check_seed(seed: object) -> None:
    check_int(seed, "seed")


def _noise_plan(
    n: int, rate: float, num_classes: int, seed: int, noise_type: str = "symmetric"
) -> tuple[Tensor, Tensor]:
    """Which of ``n`` items are flipped, and by which class offset in ``1..num_classes-1``.

    Exactly ``round(rate * n)`` items, drawn uniformly without replacement, are flipped; the
    offset is uniform in ``1..num_classes-1`` (``"symmetric"``) or 1 (``"pairflip"``: class c
    becomes c + 1 mod C). Returns a bool mask and an int64 offset per item (0 where not flipped).
    A pure function of its inputs; both types flip the same items for the same seed.
    """
    _check_rate(rate)
    _check_num_classes(num_classes)
    _check_seed(seed)
    check_choice(noise_type, "noise_type", NOISE_TYPES)
    generator = torch.Generator().manual_seed(seed)
    num_flipped = int(round(rate * n))
    chosen = torch.randperm(n, generator=generator)[:num_flipped]
    offsets = torch.zeros(n, dtype=torch.int64)
    if noise_type == "symmetric":
        offsets[chosen] = torch.randint(1, num_classes, (num_flipped,), generator=generator)
    else:
        offsets[chosen] = 1
    return offsets > 0, offsets


def label_noise(
    labels: Tensor,
    rate: float,
    num_classes: int,
    seed: int,
    noise_type: NoiseType = "symmetric",
) -> Tensor:
    """Flip exactly ``round(rate * N)`` labels, drawn uniformly without replacement.

    - ``"symmetric"``: a flipped label ``y`` becomes ``(y + k) % num_classes`` with ``k``
      uniform in ``1..num_classes-1``: uniform over the OTHER classes, never ``y`` itself.
    - ``"pairflip"``: a flipped label ``y`` becomes ``(y + 1) % num_classes`` (the
      "class-dependent" noise of the OPL / TL label-noise experiments).

    Deterministic given ``seed``; the input is not modified. (The co-teaching code draws each
    pair flip independently, so its flipped count is only ``rate * N`` in expectation; here it
    is exact.)

    Args:
        labels: 1-D integer tensor with values in ``[0, num_classes)``.
        rate: fraction of labels to flip, in ``[0, 1)``.
        num_classes: number of classes (>= 2).
        seed: seed of the draw.
        noise_type: ``"symmetric"`` or ``"pairflip"``.

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
    _, offsets = _noise_plan(labels.numel(), rate, num_classes, seed, noise_type)
    labels = labels.to(torch.int64)
    return (labels + offsets.to(labels.device)) % num_classes


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """:func:`label_noise` with ``noise_type="symmetric"`` (uniform over the other classes)."""
    return label_noise(labels, rate, num_classes, seed, "symmetric")


def pairflip_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """:func:`label_noise` with ``noise_type="pairflip"`` (class c -> (c + 1) mod C)."""
    return label_noise(labels, rate, num_classes, seed, "pairflip")


class NoisyLabelDataset(Dataset):
    """Wraps an ``(input, label, ...)`` data set and flips a fixed, seeded subset of its labels.

    The flip mask and offsets are drawn once, at construction, from ``(len(dataset), rate,
    num_classes, seed, noise_type)`` only (labels are not read in advance): item ``i`` returns
    label ``(y + k_i) % num_classes`` where :attr:`flipped` ``[i]`` is true. Over a data set with
    labels ``L`` it gives the same labels as ``label_noise(L, rate, num_classes, seed,
    noise_type)``. Items after the label (e.g. a sample index) are passed through.

    Attributes:
        flipped: bool tensor, which items have a flipped label.
        offsets: int64 tensor, the class offset of each item (0 where not flipped).
    """

    def __init__(
        self,
        dataset: Dataset,
        rate: float,
        num_classes: int,
        seed: int = 0,
        noise_type: NoiseType = "symmetric",
    ) -> None:
        self.dataset = dataset
        self.rate = rate
        self.num_classes = num_classes
        self.seed = seed
        self.noise_type = noise_type
        self.flipped, self.offsets = _noise_plan(len(dataset), rate, num_classes, seed, noise_type)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        x, y, *rest = self.dataset[index]
        if self.flipped[index]:
            k = int(self.offsets[index])
            if isinstance(y, Tensor):
                y = (y.to(torch.int64) + k) % self.num_classes
            else:
                y = (int(y) + k) % self.num_classes
        return (x, y, *rest)


class LabelNoiseDataModule(WrapperDataModule, L.LightningDataModule):
    """Adds label noise to the training split (and optionally the validation split) of another
    data module.

    ``prepare_data``, ``setup``, ``teardown`` and the loaders are delegated; after ``setup`` the
    wrapped module's ``train_dataset`` is wrapped in a :class:`NoisyLabelDataset` (and, with
    ``val_label_noise > 0``, its ``val_dataset`` too, drawn with ``seed +``
    :data:`VAL_NOISE_SEED_OFFSET`). ``train_dataloader`` / ``val_dataloader`` build the wrapped
    module's own loaders (same batch size, sampler, workers, sample indices) over the noisy data
    sets. Test labels always stay clean.

    A noisy validation split is what a real noisy-label user has: select the model on it, not on
    clean labels (which a noisy-label user does not have).

    The wrapped module must expose ``num_classes`` and ``image_shape`` and keep its data sets in
    ``train_dataset`` / ``val_dataset`` (as every :class:`ClassificationDataModule` does).

    Args:
        datamodule: the clean data module.
        rate: fraction of training labels flipped, in ``[0, 1)``.
        seed: seed of the noise.
        noise_type: ``"symmetric"`` (uniform over the other classes) or ``"pairflip"``
            (class c -> (c + 1) mod C).
        val_label_noise: fraction of validation labels flipped (same type), in ``[0, 1)``;
            0 (default) keeps validation clean.
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        rate: float,
        seed: int = 0,
        noise_type: NoiseType = "symmetric",
        val_label_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self._wrap(datamodule)
        if not hasattr(datamodule, "num_classes"):
            raise ValueError("datamodule must expose num_classes")
        _check_rate(rate)
        _check_rate(val_label_noise, "val_label_noise")
        _check_seed(seed)
        check_choice(noise_type, "noise_type", NOISE_TYPES)
        self.rate = rate
        self.seed = seed
        self.noise_type = noise_type
        self.val_label_noise = val_label_noise
        self.train_dataset: NoisyLabelDataset | None = None
        self._noisy_val: NoisyLabelDataset | None = None

    @property
    def val_dataset(self) -> Dataset | None:
        """The validation set the loaders use: noisy with ``val_label_noise > 0``."""
        if self.val_label_noise > 0:
            return self._noisy_val
        return self.clean_val_dataset

    @property
    def test_dataset(self) -> Dataset | None:
        return getattr(self.datamodule, "test_dataset", None)

    @property
    def clean_train_dataset(self) -> Dataset | None:
        """The wrapped module's training data set, with its clean labels."""
        return getattr(self.datamodule, "train_dataset", None)

    @property
    def clean_val_dataset(self) -> Dataset | None:
        """The wrapped module's validation data set, with its clean labels."""
        return getattr(self.datamodule, "val_dataset", None)

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        clean = self.clean_train_dataset
        if clean is not None and (
            self.train_dataset is None or self.train_dataset.dataset is not clean
        ):
            self.train_dataset = NoisyLabelDataset(
                clean, self.rate, self.num_classes, self.seed, self.noise_type
            )
        val = self.clean_val_dataset
        stale = self._noisy_val is None or self._noisy_val.dataset is not val
        if self.val_label_noise > 0 and val is not None and stale:
            self._noisy_val = NoisyLabelDataset(
                val,
                self.val_label_noise,
                self.num_classes,
                self.seed + VAL_NOISE_SEED_OFFSET,
                self.noise_type,
            )

    def teardown(self, stage: str | None = None) -> None:
        self.datamodule.teardown(stage)

    def _swapped_loader(self, split: str, noisy: Dataset | None) -> Any:
        if noisy is None:
            raise RuntimeError(
                f"LabelNoiseDataModule.{split}_dataset is not set: call setup() first"
            )
        attribute = f"{split}_dataset"
        clean = getattr(self.datamodule, attribute)
        setattr(self.datamodule, attribute, noisy)
        try:
            return getattr(self.datamodule, f"{split}_dataloader")()
        finally:
            setattr(self.datamodule, attribute, clean)

    def train_dataloader(self) -> DataLoader:
        """The wrapped module's training loader, over the noisy training set."""
        return self._swapped_loader("train", self.train_dataset)

    def val_dataloader(self) -> Any:
        """The wrapped module's validation loader (over noisy labels with val_label_noise > 0)."""
        if self.val_label_noise > 0:
            return self._swapped_loader("val", self._noisy_val)
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
