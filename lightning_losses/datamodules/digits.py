"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images): no download needed."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_losses.checks import check_choice, check_float
from lightning_losses.datamodules.base import ClassificationDataModule, stratified_split
from lightning_losses.datamodules.noise import (
    NOISE_TYPES,
    VAL_NOISE_SEED_OFFSET,
    NoiseType,
)
from lightning_losses.datamodules.noise import label_noise as flip_labels

__all__ = ["DigitsDataModule"]

_IMAGE_SIZES = (8, 16, 32)
_NORMALIZE = ("standard", "symmetric", "none")


class DigitsDataModule(ClassificationDataModule):
    """``sklearn.datasets.load_digits`` as a stratified train / val / test data module.

    Everything lives in memory as ``TensorDataset`` s of ``(float32 (1, S, S), int64 label)``.
    The split is stratified and a pure function of ``seed``. Pixels (0..16) are scaled to [0, 1],
    resized once (bilinear) to ``image_size`` and then normalised:

    - ``"standard"``: ``(x - mean) / std`` with the scalar mean / std of the *training* split
      (kept in :attr:`mean` / :attr:`std`);
    - ``"symmetric"``: ``2x - 1`` in [-1, 1] (the diffusion convention);
    - ``"none"``: x in [0, 1].

    With ``label_noise > 0`` exactly ``round(label_noise * N_train)`` training labels are flipped
    (seeded with ``seed``): to a uniformly drawn other class (``noise_type="symmetric"``) or
    from c to (c + 1) mod 10 (``"pairflip"``); :attr:`train_clean_targets` keeps the true labels
    and :attr:`train_noise_mask` marks the flipped ones. With ``val_label_noise > 0`` the
    validation split gets the same type of noise (``round(val_label_noise * N_val)`` labels,
    seed ``seed +`` :data:`~lightning_losses.datamodules.noise.VAL_NOISE_SEED_OFFSET`;
    :attr:`val_clean_targets`, :attr:`val_noise_mask`), as a real noisy-label user's validation
    data would be. Test labels always stay clean.

    Args:
        batch_size: items per batch.
        num_workers: loader worker processes.
        image_size: side of the images, 8 (native), 16 or 32.
        val_fraction: fraction of the whole set held out for validation.
        test_fraction: fraction of the whole set held out for testing.
        seed: seed of the split, the label noise and the training order.
        normalize: ``"standard"``, ``"symmetric"`` or ``"none"``.
        label_noise: fraction of training labels flipped, in [0, 1).
        noise_type: ``"symmetric"`` or ``"pairflip"``.
        val_label_noise: fraction of validation labels flipped, in [0, 1) (0: clean).
        return_indices: training batches are ``(x, y, index)`` (see
            :class:`~lightning_losses.datamodules.ClassificationDataModule`).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 8,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        normalize: Literal["standard", "symmetric", "none"] = "standard",
        label_noise: float = 0.0,
        noise_type: NoiseType = "symmetric",
        val_label_noise: float = 0.0,
        return_indices: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, return_indices)
        if image_size not in _IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {_IMAGE_SIZES}, got {image_size!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must be < 1 to leave training data, got "
                f"{val_fraction} + {test_fraction}"
            )
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        for name, value in (("label_noise", label_noise), ("val_label_noise", val_label_noise)):
            check_float(value, name, minimum=0.0, maximum=1.0, strict_maximum=True)
        check_choice(noise_type, "noise_type", NOISE_TYPES)
        self.save_hyperparameters()
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.normalize = normalize
        self.label_noise = label_noise
        self.noise_type = noise_type
        self.val_label_noise = val_label_noise
        self.mean: float | None = None
        self.std: float | None = None
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.test_indices: Tensor | None = None
        self.train_clean_targets: Tensor | None = None
        self.train_noise_mask: Tensor | None = None
        self.val_clean_targets: Tensor | None = None
        self.val_noise_mask: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits (cheap; done once, whatever ``stage``)."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        targets = torch.as_tensor(digits.target, dtype=torch.int64)
        n = len(targets)

        num_test = int(round(self.test_fraction * n))
        num_val = int(round(self.val_fraction * n))
        rest, test_idx = stratified_split(
            targets.numpy(), num_test, self.seed, name="round(test_fraction * N)"
        )
        train_pos, val_pos = stratified_split(
            targets[rest].numpy(), num_val, self.seed, name="round(val_fraction * N)"
        )
        train_idx, val_idx = rest[train_pos], rest[val_pos]

        if self.image_size != images.shape[-1]:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)

        if self.normalize == "standard":
            train_images = images[torch.as_tensor(train_idx)]
            self.mean = float(train_images.mean())
            self.std = float(train_images.std())
            images = (images - self.mean) / self.std
        elif self.normalize == "symmetric":
            images = images * 2.0 - 1.0

        self.train_indices = torch.as_tensor(train_idx, dtype=torch.int64)
        self.val_indices = torch.as_tensor(val_idx, dtype=torch.int64)
        self.test_indices = torch.as_tensor(test_idx, dtype=torch.int64)

        clean = targets[self.train_indices]
        noisy = clean
        if self.label_noise > 0:
            noisy = flip_labels(
                clean, self.label_noise, self.num_classes, self.seed, self.noise_type
            )
        self.train_clean_targets = clean
        self.train_noise_mask = noisy != clean
        val_clean = targets[self.val_indices]
        val_noisy = val_clean
        if self.val_label_noise > 0:
            val_seed = self.seed + VAL_NOISE_SEED_OFFSET
            val_noisy = flip_labels(
                val_clean, self.val_label_noise, self.num_classes, val_seed, self.noise_type
            )
        self.val_clean_targets = val_clean
        self.val_noise_mask = val_noisy != val_clean

        self.train_dataset = TensorDataset(images[self.train_indices].contiguous(), noisy)
        self.val_dataset = TensorDataset(images[self.val_indices].contiguous(), val_noisy)
        self.test_dataset = TensorDataset(
            images[self.test_indices].contiguous(), targets[self.test_indices]
        )
