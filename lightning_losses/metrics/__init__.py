"""Calibration metrics: functions, ``torchmetrics.Metric`` classes and reliability diagrams.

Every metric takes class PROBABILITIES ``probs`` (N, C) and integer ``labels`` (N,); logits,
rows not summing to 1 and out-of-range labels raise ``ValueError``.

The functions (:mod:`.calibration`) need torch only. The ``Metric`` classes
(:mod:`.calibration_metrics`), :func:`calibration_collection` (:mod:`.collection`) and
:func:`reliability_diagram` (:mod:`.reliability`) are loaded on first access: torchmetrics 1.9
imports ``matplotlib.pyplot`` when ``torchmetrics.Metric`` is imported, and a user who only
needs the functions should not pay for that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_losses.metrics.calibration import (
    NLL_MIN_PROB,
    BinSums,
    brier_score,
    calibration_bins,
    calibration_error,
    calibration_error_from_bins,
    classwise_calibration_error,
    confidences_and_correct,
    correctness_auroc,
    negative_log_likelihood,
    uniform_bin_edges,
    uniform_bin_index,
)

if TYPE_CHECKING:
    from lightning_losses.metrics.calibration_metrics import (
        BrierScore,
        CalibrationError,
        ClasswiseCalibrationError,
        CorrectnessAUROC,
        NegativeLogLikelihood,
    )
    from lightning_losses.metrics.collection import calibration_collection
    from lightning_losses.metrics.digits_fid import (
        digits_fid_features,
        digits_real_images,
        frechet_distance,
    )
    from lightning_losses.metrics.reliability import reliability_diagram

_LAZY = {
    "BrierScore": "calibration_metrics",
    "CalibrationError": "calibration_metrics",
    "ClasswiseCalibrationError": "calibration_metrics",
    "CorrectnessAUROC": "calibration_metrics",
    "NegativeLogLikelihood": "calibration_metrics",
    "calibration_collection": "collection",
    # digits_fid() itself is NOT re-exported: it shares its submodule's name, and
    # lightning_losses.metrics.digits_fid must stay the module (import the function from it).
    "digits_fid_features": "digits_fid",
    "digits_real_images": "digits_fid",
    "frechet_distance": "digits_fid",
    "reliability_diagram": "reliability",
}

__all__ = [
    "NLL_MIN_PROB",
    "BinSums",
    "BrierScore",
    "CalibrationError",
    "ClasswiseCalibrationError",
    "CorrectnessAUROC",
    "NegativeLogLikelihood",
    "brier_score",
    "calibration_bins",
    "calibration_collection",
    "calibration_error",
    "calibration_error_from_bins",
    "classwise_calibration_error",
    "confidences_and_correct",
    "correctness_auroc",
    "digits_fid_features",
    "digits_real_images",
    "frechet_distance",
    "negative_log_likelihood",
    "reliability_diagram",
    "uniform_bin_edges",
    "uniform_bin_index",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
