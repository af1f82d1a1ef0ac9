"""The calibration metrics of the CA paper as one ``torchmetrics.MetricCollection``."""

from __future__ import annotations

from torchmetrics import MetricCollection

from lightning_losses.checks import check_positive_int
from lightning_losses.metrics.calibration_metrics import (
    BrierScore,
    CalibrationError,
    ClasswiseCalibrationError,
    CorrectnessAUROC,
    NegativeLogLikelihood,
)


def calibration_collection(
    num_classes: int, n_bins: int = 15, prefix: str | None = None
) -> MetricCollection:
    """ECE, adaptive ECE, class-wise ECE, NLL, Brier scores and AUROC, fed with (probs, labels).

    Keys (after ``prefix``, e.g. ``"val/"``):

    - ``ece``: equal-width ECE with ``n_bins`` bins; ``ece25``: with 25 bins (the CA paper);
    - ``adaptive_ece``: equal-mass ECE with ``n_bins`` bins;
    - ``classwise_ece``: class-wise ECE with ``n_bins`` equal-width bins;
    - ``nll``; ``brier`` (multi-class) and ``top_label_brier`` (the CA paper's);
    - ``auroc``: AUROC of confidence for correct vs wrong predictions.

    ``adaptive_ece`` and ``auroc`` hold the same per-sample state: torchmetrics' compute groups
    update it once for both.
    """
    check_positive_int(num_classes, "num_classes")
    metrics = {
        "ece": CalibrationError(n_bins=n_bins),
        "ece25": CalibrationError(n_bins=25),
        "adaptive_ece": CalibrationError(n_bins=n_bins, binning="quantile"),
        "classwise_ece": ClasswiseCalibrationError(num_classes, n_bins=n_bins),
        "nll": NegativeLogLikelihood(),
        "brier": BrierScore(),
        "top_label_brier": BrierScore(top_label=True),
        "auroc": CorrectnessAUROC(),
    }
    return MetricCollection(metrics, prefix=prefix)
