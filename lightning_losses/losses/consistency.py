"""The consistency-distillation loss (Song et al. 2023; pseudo-Huber from Song & Dhariwal 2023).

The student's output on a noisy image, :math:`f_\\theta(x_{\\sigma_i}, \\sigma_i)`, is pulled
towards a target that is treated as a constant (stop-gradient), the target network's output one
teacher ODE step further, :math:`f_{\\theta^-}(\\hat x_{\\sigma_{i+1}}, \\sigma_{i+1})`:

.. math::

    \\mathcal{L} = \\frac1B \\sum_{b=1}^{B} d\\big(f_b, \\mathrm{sg}(f^-_b)\\big),

with, over the :math:`D = C H W` elements of one sample (openai's ``mean_flat`` for l2 / l1,
iCT's norm over the whole sample for pseudo-Huber):

- ``"l2"``: :math:`d = \\frac1D \\lVert f - f^- \\rVert_2^2`;
- ``"l1"``: :math:`d = \\frac1D \\lVert f - f^- \\rVert_1`;
- ``"pseudo_huber"``: :math:`d = \\sqrt{\\lVert f - f^- \\rVert_2^2 + c^2} - c`, by default
  :math:`c = 0.00054 \\sqrt{D}` (iCT's choice, :func:`pseudo_huber_c`): about the l2 norm for
  large differences, :math:`\\lVert\\cdot\\rVert_2^2 / (2c)` near 0, with a gradient that is
  bounded (by 1 per sample) and smooth.

LPIPS (the paper's best CIFAR-10 metric) needs pretrained weights and is not here. Computed in
at least float32 with autocast disabled (bf16 inputs are upcast; float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_losses.checks import describe

__all__ = [
    "DISTANCES",
    "ConsistencyLossOutput",
    "consistency_distance",
    "consistency_loss",
    "pseudo_huber_c",
]

#: The distances :func:`consistency_loss` accepts.
DISTANCES: tuple[str, ...] = ("l2", "l1", "pseudo_huber")


def pseudo_huber_c(shape: Sequence[int]) -> float:
    """iCT's default pseudo-Huber constant :math:`c = 0.00054 \\sqrt{D}`, D = C * H * W.

    ``shape`` is ONE sample's shape, e.g. ``(3, 32, 32)`` (c = 0.0299 on CIFAR-10).
    """
    size = math.prod(int(s) for s in shape)
    if size < 1:
        raise ValueError(f"shape must describe at least one element, got {tuple(shape)}")
    return 0.00054 * math.sqrt(size)


def _check(pred: Tensor, target: Tensor, distance: str, huber_c: float | None) -> None:
    for name, value in (("pred", pred), ("target", target)):
        if not isinstance(value, Tensor) or value.ndim < 2:
            raise ValueError(
                f"{name} must be a batched tensor of shape (B, ...), got {describe(value)}"
            )
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if pred.shape != target.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)}; "
            "they must match"
        )
    if pred.shape[0] == 0 or pred[0].numel() == 0:
        raise ValueError(f"pred must hold at least one non-empty sample, got {tuple(pred.shape)}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if huber_c is not None and not (
        isinstance(huber_c, int | float) and math.isfinite(huber_c) and huber_c > 0
    ):
        raise ValueError(f"huber_c must be None or a finite float > 0, got {huber_c!r}")


def consistency_distance(
    pred: Tensor,
    target: Tensor,
    distance: str = "l2",
    huber_c: float | None = None,
) -> Tensor:
    """Per-sample distances ``(B,)`` of :func:`consistency_loss` (``target`` detached).

    Raises:
        ValueError: for tensors that are not batched floats of one shape, an empty batch, an
            unknown ``distance`` or a ``huber_c`` that is not a finite float > 0.
    """
    _check(pred, target, distance, huber_c)
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        diff = (pred.to(dtype) - target.detach().to(dtype)).flatten(1)
        if distance == "l2":
            return diff.square().mean(dim=1)
        if distance == "l1":
            return diff.abs().mean(dim=1)
        c = pseudo_huber_c(pred.shape[1:]) if huber_c is None else float(huber_c)
        return (diff.square().sum(dim=1) + c**2).sqrt() - c


class ConsistencyLossOutput(NamedTuple):
    """:func:`consistency_loss`: the loss and ``mse``, the mean squared difference over every
    element (detached; comparable across distances)."""

    loss: Tensor
    mse: Tensor


def consistency_loss(
    pred: Tensor,
    target: Tensor,
    distance: str = "l2",
    huber_c: float | None = None,
) -> ConsistencyLossOutput:
    """The consistency loss: the batch mean of :func:`consistency_distance` (module docstring).

    Args:
        pred: the student's output :math:`f_\\theta(x_{\\sigma_i}, \\sigma_i)`, ``(B, ...)``.
        target: the target :math:`f_{\\theta^-}(\\hat x_{\\sigma_{i+1}}, \\sigma_{i+1})`, same
            shape; detached here (no gradient reaches it).
        distance: ``"l2"``, ``"l1"`` or ``"pseudo_huber"``.
        huber_c: the pseudo-Huber constant c > 0; None: :math:`0.00054 \\sqrt{C H W}`.

    Returns:
        :class:`ConsistencyLossOutput`; ``loss`` is a 0-d tensor in at least float32.

    Raises:
        ValueError: as :func:`consistency_distance`.
    """
    loss = consistency_distance(pred, target, distance, huber_c).mean()
    with torch.no_grad():
        mse = (pred.detach().to(loss.dtype) - target.detach().to(loss.dtype)).square().mean()
    return ConsistencyLossOutput(loss, mse)
