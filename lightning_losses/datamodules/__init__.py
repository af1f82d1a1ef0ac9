"""LightningDataModules for image classification.

Light on purpose: torchvision data sets are imported inside the methods that read them.
"""

from lightning_losses.datamodules.base import (
    ClassificationDataModule,
    TransformedSubset,
    stratified_split,
)
from lightning_losses.datamodules.cifar import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
)
from lightning_losses.datamodules.digits import DigitsDataModule
from lightning_losses.datamodules.folder import ImageFolderDataModule
from lightning_losses.datamodules.noise import (
    LabelNoiseDataModule,
    NoisyLabelDataset,
    symmetric_label_noise,
)
from lightning_losses.datamodules.sampling import EpochSeededRandomSampler

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "EpochSeededRandomSampler",
    "ImageFolderDataModule",
    "LabelNoiseDataModule",
    "NoisyLabelDataset",
    "TransformedSubset",
    "stratified_split",
    "symmetric_label_noise",
]
