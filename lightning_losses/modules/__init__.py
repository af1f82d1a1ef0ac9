"""LightningModules: each assembled from injected networks and losses."""

from lightning_losses.modules.calibration import PostHocCalibration
from lightning_losses.modules.classifier import OPLClassifier
from lightning_losses.modules.consistency import ConsistencyDistillation
from lightning_losses.modules.diff_instruct import DiffInstructDistillation
from lightning_losses.modules.distillation import DMDDistillation, OneStepDistillation
from lightning_losses.modules.schedulers import WarmupMultiStepLR
from lightning_losses.modules.teacher import DiffusionTeacher

__all__ = [
    "ConsistencyDistillation",
    "DMDDistillation",
    "DiffInstructDistillation",
    "DiffusionTeacher",
    "OneStepDistillation",
    "OPLClassifier",
    "PostHocCalibration",
    "WarmupMultiStepLR",
]
