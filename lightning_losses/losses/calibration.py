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
unweighted mean :math:`\\frac1N \\sum_i (c_i - y_i)^2`.

Baselines of the paper: the "CE calibrator" objective :func:`calibration_cross_entropy`
(:math:`-\\frac1N \\sum_i \\log p_{i \\ell_i}`) and the MSE objective :func:`calibration_mse`,
which we take to be the multi-class Brier score used as a loss,

.. math::

    L_{MSE} = \\frac1N \\sum_i \\sum_k (p_{ik} - [k = \\ell_i])^2,

i.e. a sum over classes and a mean over samples (``F.mse_loss`` on one-hot targets would divide
by :math:`K` as well; that only rescales the gradient).

Every function computes in at least float32 (bf16 / fp16 inputs are upcast and autocast is
disabled inside); float64 inputs stay float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CalibrationCrossEntropy",
    "CalibrationMSE",
    "CorrectnessAwareLoss",
    "calibration_cross_entropy",
    "calibration_mse",
    "correctness_aware_loss",
    "correctness_weights",
]


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    """Raise a ValueError naming the argument unless (N, C) finite float logits, (N,) int labels."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D tensor of shape (N, C), got {_shape(logits)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(
            f"logits must have C >= 2 classes (shape (N, C)), got {tuple(logits.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one sample (N >= 1), got N = 0")
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor of shape (N,), got {_shape(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor of class indices, got dtype {labels.dtype}; "
            "convert one-hot or soft labels with labels.argmax(dim=1)"
        )
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but logits has {logits.shape[0]} rows; "
            "they must match"
        )
    num_classes = logits.shape[1]
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for logits with C = "
            f"{num_classes}, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf; check the classifier or the calibrator")


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32: squared gaps of confidences near 1 vanish in bf16.
    return torch.promote_types(dtype, torch.float32)


def correctness_weights(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
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
    return _correctness_weights(logits.detach(), labels, _working_dtype(logits.dtype))


def _correctness_weights(
    logits: Tensor, labels: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    correct = (logits.argmax(dim=1) == labels).to(dtype)
    accuracy = correct.mean()
    weights = torch.where(correct > 0, 1.0 - accuracy, accuracy)
    return correct, weights


def correctness_aware_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Correctness-aware loss of a batch of calibrated logits; see the module docstring.

    Args:
        logits: (N, C) CALIBRATED logits, e.g. :math:`z_0 / T(x)`; finite, any float dtype.
            bf16 / fp16 (and autocast) are computed in float32, float64 stays float64.
        labels: (N,) integer class indices in [0, C).

    Returns:
        The scalar :math:`L_{CA}`. Gradient flows through the confidences :math:`c_i` only; the
        correctness :math:`y_i` and the weights :math:`w_i` are constants. All-correct or
        all-wrong batches (:math:`\\sum_i w_i = 0`) give the unweighted mean of
        :math:`(c_i - y_i)^2`, never NaN.

    Raises:
        ValueError: naming ``logits`` or ``labels`` on a wrong shape, dtype or value range.
    """
    _check_logits_labels(logits, labels)
    dtype = _working_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        correct, weights = _correctness_weights(z.detach(), labels, dtype)
        pred = z.detach().argmax(dim=1, keepdim=True)
        confidence = torch.softmax(z, dim=1).gather(1, pred).squeeze(1)
        squared = (confidence - correct) ** 2
        total = weights.sum()
        # The weights are exactly 0 for every sample iff the batch is all correct or all wrong.
        weighted = (weights * squared).sum() / torch.where(total > 0, total, 1.0)
        loss = torch.where(total > 0, weighted, squared.mean())
    return loss


def calibration_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy (NLL) of calibrated logits: the "CE calibrator" objective.

    :math:`L_{CE} = -\\frac1N \\sum_i \\log \\mathrm{softmax}(z_i)_{\\ell_i}`, computed in at
    least float32. Arguments and errors as in :func:`correctness_aware_loss`.
    """
    _check_logits_labels(logits, labels)
    dtype = _working_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.to(dtype), labels)


def calibration_mse(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-class Brier score of calibrated logits as a loss: the paper's MSE objective.

    :math:`L_{MSE} = \\frac1N \\sum_i \\sum_k (\\mathrm{softmax}(z_i)_k - [k = \\ell_i])^2`: summed
    over the C classes, averaged over the N samples (in [0, 2]). Computed in at least float32.
    Arguments and errors as in :func:`correctness_aware_loss`.
    """
    _check_logits_labels(logits, labels)
    dtype = _working_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.to(dtype), dim=1)
        onehot = F.one_hot(labels.long(), probs.shape[1]).to(dtype)
        return ((probs - onehot) ** 2).sum(dim=1).mean()


class CorrectnessAwareLoss(nn.Module):
    """:func:`correctness_aware_loss` as a module (``forward(logits, labels) -> Tensor``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return correctness_aware_loss(logits, labels)


class CalibrationCrossEntropy(nn.Module):
    """:func:`calibration_cross_entropy` as a module (``forward(logits, labels) -> Tensor``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return calibration_cross_entropy(logits, labels)


class CalibrationMSE(nn.Module):
    """:func:`calibration_mse` as a module (``forward(logits, labels) -> Tensor``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return calibration_mse(logits, labels)
