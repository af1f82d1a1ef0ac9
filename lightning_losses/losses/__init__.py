"""Losses as plain PyTorch: functions returning the scalar and the parts worth logging."""

from lightning_losses.losses.calibration import (
    CalibrationCrossEntropy,
    CalibrationMSE,
    CorrectnessAwareLoss,
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
    correctness_weights,
)
from lightning_losses.losses.distillation import (
    dmd_gradient,
    dmd_loss,
    fake_denoiser_loss,
)
from lightning_losses.losses.embedding import (
    EmbeddingLoss,
    EmbeddingLossOutput,
    mmd2,
)
from lightning_losses.losses.opl import (
    OPLOutput,
    OrthogonalProjectionLoss,
    all_gather_rows,
    orthogonal_projection_loss,
    pair_sums,
)

__all__ = [
    "OPLOutput",
    "OrthogonalProjectionLoss",
    "all_gather_rows",
    "orthogonal_projection_loss",
    "pair_sums",
    "CalibrationCrossEntropy",
    "CalibrationMSE",
    "CorrectnessAwareLoss",
    "calibration_cross_entropy",
    "calibration_mse",
    "correctness_aware_loss",
    "correctness_weights",
    "EmbeddingLoss",
    "EmbeddingLossOutput",
    "mmd2",
    "dmd_gradient",
    "dmd_loss",
    "fake_denoiser_loss",
]
