"""LightningDataModules for image classification.

Light on purpose: torchvision data sets are imported inside the methods that read them.
"""

from lightning_losses.datamodules.base import (
    ClassificationDataModule,
    IndexedDataset,
    TransformedSubset,
    stratified_split,
)
from lightning_losses.datamodules.calibration import (
    CachedOutputs,
    CalibrationDataModule,
    collate_cached,
    dataset_targets,
)
from lightning_losses.datamodules.cifar import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
)
from lightning_losses.datamodules.digits import DigitsDataModule
from lightning_losses.datamodules.folder import ImageFolderDataModule
from lightning_losses.datamodules.noise import (
    NOISE_TYPES,
    LabelNoiseDataModule,
    NoisyLabelDataset,
    label_noise,
    pairflip_label_noise,
    symmetric_label_noise,
)
from lightning_losses.datamodules.sampling import EpochSeededRandomSampler
from lightning_losses.datamodules.shifts import (
    CIFAR10C_CORRUPTIONS,
    CORRUPTIONS,
    CIFAR10CDataset,
    CorruptedDataset,
    ImageNetVariantFolder,
    cifar10c_test_sets,
    corrupted_test_sets,
    restrict_logits,
)
from lightning_losses.datamodules.views import (
    Denormalized,
    MinMaxRescaled,
    ViewsDataset,
    default_view_transforms,
)

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
    "IndexedDataset",
    "NOISE_TYPES",
    "label_noise",
    "pairflip_label_noise",
    "CIFAR10C_CORRUPTIONS",
    "CORRUPTIONS",
    "CIFAR10CDataset",
    "CachedOutputs",
    "CalibrationDataModule",
    "CorruptedDataset",
    "Denormalized",
    "ImageNetVariantFolder",
    "MinMaxRescaled",
    "ViewsDataset",
    "cifar10c_test_sets",
    "collate_cached",
    "corrupted_test_sets",
    "dataset_targets",
    "default_view_transforms",
    "restrict_logits",
]
