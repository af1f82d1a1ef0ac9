"""Callbacks that measure what the papers claim: feature geometry, calibration, FID."""

from lightning_losses.callbacks.calibration import CalibrationCallback
from lightning_losses.callbacks.feature_geometry import FeatureGeometryCallback, cosine_geometry
from lightning_losses.callbacks.fid import FIDCallback
from lightning_losses.callbacks.gradient_variance import (
    GradientVarianceCallback,
    fit_variance_floor,
    generator_gradient_variance,
    gradient_variance,
)
from lightning_losses.callbacks.sample_grid import SampleGridCallback

__all__ = [
    "CalibrationCallback",
    "FIDCallback",
    "FeatureGeometryCallback",
    "GradientVarianceCallback",
    "SampleGridCallback",
    "cosine_geometry",
    "fit_variance_floor",
    "generator_gradient_variance",
    "gradient_variance",
]
