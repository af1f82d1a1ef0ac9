"""LightningModules: each assembled from injected networks and losses."""

from lightning_losses.modules.calibration import PostHocCalibration
from lightning_losses.modules.classifier import OPLClassifier
from lightning_losses.modules.consistency import ConsistencyDistillation
from lightning_losses.modules.diff_instruct import DiffInstructDistillation
from lightning_losses.modules.distillation import OneStepDistillation
from lightning_losses.modules.dmd import DMDDistillation
from lightning_losses.modules.gan_regression import GANSupplement, RegressionSupplement
from lightning_losses.modules.schedulers import WarmupMultiStepLR
from lightning_losses.modules.score_distillation import ScoreDistillation
from lightning_losses.modules.supplementary import EmbeddingSupplement, SupplementaryLoss
from lightning_losses.modules.teacher import DiffusionTeacher

__all__ = [
    "ConsistencyDistillation",
    "DMDDistillation",
    "DiffInstructDistillation",
    "DiffusionTeacher",
    "EmbeddingSupplement",
    "GANSupplement",
    "OneStepDistillation",
    "OPLClassifier",
    "PostHocCalibration",
    "RegressionSupplement",
    "ScoreDistillation",
    "SupplementaryLoss",
    "WarmupMultiStepLR",
]
