"""Losses as plain PyTorch: functions returning the scalar and the parts worth logging."""

from lightning_losses.losses.calibration import (
    CA_WEIGHTINGS,
    CalibrationCrossEntropy,
    CalibrationLossOutput,
    CalibrationMSE,
    CorrectnessAwareLoss,
    CorrectnessWeights,
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
    correctness_aware_objective,
    correctness_weights,
    tempered_confidence,
)
from lightning_losses.losses.consistency import (
    ConsistencyLossOutput,
    consistency_distance,
    consistency_loss,
    pseudo_huber_c,
)
from lightning_losses.losses.distillation import (
    DiffInstructLossOutput,
    DMDLossOutput,
    diff_instruct_loss,
    dmd_gradient,
    dmd_loss,
    fake_denoiser_loss,
)
from lightning_losses.losses.embedding import (
    EmbeddingLoss,
    EmbeddingLossOutput,
    mmd2,
)
from lightning_losses.losses.gan import (
    GANDiscriminatorOutput,
    GANGeneratorOutput,
    gan_discriminator_loss,
    gan_generator_loss,
)
from lightning_losses.losses.opl import (
    OPLOutput,
    OrthogonalProjectionLoss,
    all_gather_rows,
    orthogonal_projection_loss,
    pair_sums,
)
from lightning_losses.losses.regression import (
    REGRESSION_DISTANCES,
    RegressionLoss,
    RegressionLossOutput,
    regression_loss,
)
from lightning_losses.losses.robust import (
    GCEOutput,
    TruncatedLqOutput,
    generalized_cross_entropy,
    truncated_lq_loss,
)

__all__ = [
    "ConsistencyLossOutput",
    "DiffInstructLossOutput",
    "DMDLossOutput",
    "OPLOutput",
    "OrthogonalProjectionLoss",
    "all_gather_rows",
    "orthogonal_projection_loss",
    "pair_sums",
    "GCEOutput",
    "TruncatedLqOutput",
    "generalized_cross_entropy",
    "truncated_lq_loss",
    "CA_WEIGHTINGS",
    "CalibrationCrossEntropy",
    "CalibrationLossOutput",
    "CorrectnessWeights",
    "CalibrationMSE",
    "CorrectnessAwareLoss",
    "calibration_cross_entropy",
    "calibration_mse",
    "correctness_aware_loss",
    "correctness_aware_objective",
    "tempered_confidence",
    "correctness_weights",
    "EmbeddingLoss",
    "EmbeddingLossOutput",
    "mmd2",
    "diff_instruct_loss",
    "consistency_distance",
    "consistency_loss",
    "pseudo_huber_c",
    "dmd_gradient",
    "dmd_loss",
    "fake_denoiser_loss",
    "GANDiscriminatorOutput",
    "GANGeneratorOutput",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "REGRESSION_DISTANCES",
    "RegressionLoss",
    "RegressionLossOutput",
    "regression_loss",
]
