"""Networks: CIFAR ResNets and feature backbones.

Every backbone maps (B, C, H, W) inputs to (B, feature_dim) pooled, post-ReLU penultimate features
and exposes an int ``feature_dim`` attribute. This package imports torch only: torchvision is
imported inside :class:`TorchvisionBackbone`, and never Lightning.
"""

from lightning_losses.nets.backbones import (
    TORCHVISION_RESNETS,
    MLPBackbone,
    SmallCNN,
    TorchvisionBackbone,
    TorchvisionClassifier,
    feature_dim_of,
    load_state_dict_file,
)
from lightning_losses.nets.binning import HistogramBinning, IsotonicCalibration
from lightning_losses.nets.calibrator_fit import FitHistory, fit_calibrator
from lightning_losses.nets.calibrators import (
    CorrectnessAwareCalibrator,
    PostHocCalibrator,
    TemperatureCalibrator,
    TemperatureScaling,
    fit_temperature,
)
from lightning_losses.nets.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lightning_losses.nets.embedders import EMBEDDER_FAMILIES, RandomEmbedderBank
from lightning_losses.nets.gan_head import FeatureTap, GANHead
from lightning_losses.nets.lpips import LPIPS
from lightning_losses.nets.scaling import EnsembleTemperatureScaling, MatrixScaling, VectorScaling

__all__ = [
    "LPIPS",
    "FeatureTap",
    "GANHead",
    "TORCHVISION_RESNETS",
    "BasicBlock",
    "CifarResNet",
    "MLPBackbone",
    "SmallCNN",
    "TorchvisionBackbone",
    "TorchvisionClassifier",
    "feature_dim_of",
    "load_state_dict_file",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "CorrectnessAwareCalibrator",
    "EnsembleTemperatureScaling",
    "FitHistory",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "VectorScaling",
    "PostHocCalibrator",
    "fit_calibrator",
    "TemperatureCalibrator",
    "TemperatureScaling",
    "fit_temperature",
    "EMBEDDER_FAMILIES",
    "RandomEmbedderBank",
]
