"""LightningModules: each assembled from injected networks and losses."""

from lightning_losses.modules.classifier import OPLClassifier
from lightning_losses.modules.schedulers import WarmupMultiStepLR

__all__ = ["OPLClassifier", "WarmupMultiStepLR"]
