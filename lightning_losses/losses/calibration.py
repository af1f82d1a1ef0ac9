"""Post-hoc calibration objectives: the correctness-aware (CA) loss and its baselines.

All of them take CALIBRATED logits (e.g. :math:`z_0 / T(x)` from a calibrator head) and integer
labels.

Correctness-aware loss (Liu et al., arXiv 2404.13016). With :math:`p_i = \\mathrm{softmax}(z_i)`,
confidence :math:`c_i = \\max_k p_{ik}`, correctness :math:`y_i = [\\arg\\max_k z_{ik} = \\ell_i]`
(a constant: no gradient flows through it), batch accuracy :math:`a = \\frac1N \\sum_i y_i` and
class-balance weights :math:`w_i = 1 - a` for correct samples, :math:`w_i = a` for wrong ones,

.. math::

    L_{CA} = \\frac{\\sum_i w_i (c_i - y_i)^2}{\\sum_i w_i}.

The weights make both groups count equally (each group's weights sum to :math:`a (1 - a) N`).
When the batch is all correct or all wrong, :math:`\\sum_i w_i = 0` and the loss falls back to the
unweighted mean :math:`\\frac1N \\sum_i (c_i - y_i)^2`. ``weighting="none"`` uses that unweighted
mean for every batch: the balance moves the minimiser for a sample that is correct with
probability :math:`p` from :math:`c^* = p` to :math:`c^* = (1-a)p / ((1-a)p + a(1-p))`, which is
under-confident whenever :math:`a > 1/2`.

Baselines of the paper: the "CE calibrator" objective :func:`calibration_cross_entropy`
(:math:`-\\frac1N \\sum_i \\log p_{i \\ell_i}`) and the MSE objective :func:`calibration_mse`,
which we take to be the multi-class Brier score used as a loss,

.. math::

    L_{MSE} = \\frac1N \\sum_i \\sum_k (p_{ik} - [k = \\ell_i])^2,

i.e. a sum over classes and a mean over samples (``F.mse_loss`` on one-hot targets would divide
by :math:`K` as well; that only rescales the gradient).

Every function returns a :class:`CalibrationLossOutput` (``loss`` first, then the batch
accuracy and mean confidence worth logging) and computes in at least float32 (bf16 / fp16
inputs are upcast and autocast is disabled inside); float64 inputs stay float64.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.checks import (
    all_true,
    check_choice,
    check_class_labels,
    check_floating,
    check_same_length,
    check_tensor,
    working_dtype,
)

__all__ = [
    "CA_WEIGHTINGS",
    "CalibrationCrossEntropy",
    "CalibrationLossOutput",
    "CalibrationMSE",
    "CorrectnessAwareLoss",
    "CorrectnessWeights",
    "calibration_cross_entropy",
    "calibration_mse",
    "correctness_aware_loss",
    "correctness_weights",
]

CA_WEIGHTINGS: tuple[str, ...] = ("balanced", "none")


class CalibrationLossOutput(NamedTuple):
    """What every calibration objective returns: the scalar to minimise, then what to log."""

    loss: Tensor
    """The scalar objective (differentiable)."""
    accuracy: Tensor
    """Share of the batch whose argmax equals the label (no gradient)."""
    confidence: Tensor
    """Mean top-label confidence of the calibrated logits (no gradient)."""


class CorrectnessWeights(NamedTuple):
    """Correctness :math:`y_i` and class-balance weights :math:`w_i` of the CA loss."""

    correct: Tensor
    weights: Tensor


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    """Raise a ValueError naming the argument unless (N, C) finite float logits, (N,) int labels.

    Shapes and dtypes read no values; the label range and finiteness are read in ONE host copy.
    """
    check_tensor(logits, "logits", 2, "(N, C)")
    check_floating(logits, "logits")
    if logits.shape[1] < 2:
        raise ValueError(
            f"logits must have C >= 2 classes (shape (N, C)), got {tuple(logits.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError(
            f"logits must hold at least one sample (N >= 1), got {tuple(logits.shape)}"
        )
    check_class_labels(labels, "labels")
    check_same_length(logits, "logits", labels, "labels")
    num_classes = logits.shape[1]
    in_range, finite = all_true(
        ((labels >= 0) & (labels < num_classes)).all(), torch.isfinite(logits.detach()).all()
    )
    if not in_range:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for logits with C = "
            f"{num_classes}, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if not finite:
        raise ValueError(
            "logits must be finite, got NaN or inf; check the classifier or the calibrator"
        )


def correctness_weights(logits: Tensor, labels: Tensor) -> CorrectnessWeights:
    """Correctness :math:`y_i` and class-balance weights :math:`w_i` of the CA loss.

    Args:
        logits: (N, C) logits; only their argmax is used (calibrated or not gives the same).
        labels: (N,) integer class indices in [0, C).

    Returns:
        ``(correct, weights)``, both (N,) in the working dtype (at least float32) and without
        gradient: ``correct`` is 1.0 where ``argmax(logits) == labels`` else 0.0, ``weights`` is
        :math:`1 - a` on correct and :math:`a` on wrong samples, :math:`a` the batch accuracy.
        All-correct or all-wrong batches give all-zero weights (see
        :func:`correctness_aware_loss` for the fallback).
    """
    _check_logits_labels(logits, labels)
    return _correctness_weights(logits.detach(), labels, working_dtype(logits))


def _correctness_weights(logits: Tensor, labels: Tensor, dtype: torch.dtype) -> CorrectnessWeights:
    correct = (logits.argmax(dim=1) == labels).to(dtype)
    accuracy = correct.mean()
    weights = torch.where(correct > 0, 1.0 - accuracy, accuracy)
    return CorrectnessWeights(correct, weights)


def correctness_aware_loss(
    logits: Tensor,
    labels: Tensor,
    weighting: Literal["balanced", "none"] = "balanced",
) -> CalibrationLossOutput:
    """Correctness-aware loss of a batch of calibrated logits; see the module docstring.

    Args:
        logits: (N, C) CALIBRATED logits, e.g. :math:`z_0 / T(x)`; finite, any float dtype.
            bf16 / fp16 (and autocast) are computed in float32, float64 stays float64.
        labels: (N,) integer class indices in [0, C).
        weighting: ``"balanced"`` (the paper's class-balance weights :math:`w_i`) or ``"none"``
            (the plain mean of :math:`(c_i - y_i)^2`).

    Returns:
        ``(loss, accuracy, confidence)``. Gradient flows through the confidences :math:`c_i`
        only; the correctness :math:`y_i` and the weights :math:`w_i` are constants.
        All-correct or all-wrong batches (:math:`\\sum_i w_i = 0`) give the unweighted mean of
        :math:`(c_i - y_i)^2`, never NaN.

    Raises:
        ValueError: naming ``logits``, ``labels`` or ``weighting`` on a wrong shape, dtype,
            value range or option.
    """
    check_choice(weighting, "weighting", CA_WEIGHTINGS)
    _check_logits_labels(logits, labels)
    dtype = working_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        correct, weights = _correctness_weights(z.detach(), labels, dtype)
        pred = z.detach().argmax(dim=1, keepdim=True)
        confidence = torch.softmax(z, dim=1).gather(1, pred).squeeze(1)
        squared = (confidence - correct) ** 2
        if weighting == "none":
            loss = squared.mean()
        else:
            total = weights.sum()
            # The weights are exactly 0 for every sample iff the batch is all correct or wrong.
            weighted = (weights * squared).sum() / torch.where(total > 0, total, 1.0)
            loss = torch.where(total > 0, weighted, squared.mean())
    return CalibrationLossOutput(loss, correct.mean(), confidence.detach().mean())


def _summary(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(accuracy, mean top-label confidence) of detached logits ``z``."""
    z = z.detach()
    accuracy = (z.argmax(dim=1) == labels).to(z.dtype).mean()
    return accuracy, torch.softmax(z, dim=1).amax(dim=1).mean()


def calibration_cross_entropy(logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
    """Mean cross-entropy (NLL) of calibrated logits: the "CE calibrator" objective.

    :math:`L_{CE} = -\\frac1N \\sum_i \\log \\mathrm{softmax}(z_i)_{\\ell_i}`, computed in at
    least float32. Arguments, output and errors as in :func:`correctness_aware_loss`.
    """
    _check_logits_labels(logits, labels)
    dtype = working_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        return CalibrationLossOutput(F.cross_entropy(z, labels), *_summary(z, labels))


def calibration_mse(logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
    """Multi-class Brier score of calibrated logits as a loss: the paper's MSE objective.

    :math:`L_{MSE} = \\frac1N \\sum_i \\sum_k (\\mathrm{softmax}(z_i)_k - [k = \\ell_i])^2`: summed
    over the C classes, averaged over the N samples (in [0, 2]). Computed in at least float32.
    Arguments, output and errors as in :func:`correctness_aware_loss`.
    """
    _check_logits_labels(logits, labels)
    dtype = working_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        probs = torch.softmax(z, dim=1)
        onehot = F.one_hot(labels.long(), probs.shape[1]).to(dtype)
        loss = ((probs - onehot) ** 2).sum(dim=1).mean()
        return CalibrationLossOutput(loss, *_summary(z, labels))


class CorrectnessAwareLoss(nn.Module):
    """:func:`correctness_aware_loss` as a module (``forward(logits, labels)``)."""

    def __init__(self, weighting: Literal["balanced", "none"] = "balanced") -> None:
        super().__init__()
        self.weighting = check_choice(weighting, "weighting", CA_WEIGHTINGS)

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return correctness_aware_loss(logits, labels, weighting=self.weighting)


class CalibrationCrossEntropy(nn.Module):
    """:func:`calibration_cross_entropy` as a module (``forward(logits, labels)``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return calibration_cross_entropy(logits, labels)


class CalibrationMSE(nn.Module):
    """:func:`calibration_mse` as a module (``forward(logits, labels)``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return calibration_mse(logits, labels)
