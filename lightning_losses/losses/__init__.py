"""Losses as plain PyTorch: functions returning the scalar and the parts worth logging."""

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
]
