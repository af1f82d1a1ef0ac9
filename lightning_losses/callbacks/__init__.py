"""Callbacks that measure what the papers claim: feature geometry, calibration, FID."""

from lightning_losses.callbacks.calibration import CalibrationCallback
from lightning_losses.callbacks.feature_geometry import FeatureGeometryCallback, cosine_geometry

__all__ = ["CalibrationCallback", "FeatureGeometryCallback", "cosine_geometry"]
