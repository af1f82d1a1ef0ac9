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
unweighted mean :math:`\\frac1N \\sum_i (c_i - y_i)^2`. ``weighting="balanced"`` is the authors'
code exactly (weights from each mini-batch's accuracy); ``weighting="split"`` takes :math:`a` from a
given ``accuracy`` (e.g. the whole calibration split's) instead of the batch's, so the weights do
not jump between batches of a split with few errors; ``weighting="none"`` uses the unweighted
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

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses import checks

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
    "correctness_aware_objective",
    "correctness_weights",
    "tempered_confidence",
]

CA_WEIGHTINGS: tuple[str, ...] = ("balanced", "split", "none")


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
    checks.check_tensor(logits, "logits", 2, "(N, C)")
    checks.check_floating(logits, "logits")
    if logits.shape[1] < 2:
        raise ValueError(
            f"logits must have C >= 2 classes (shape (N, C)), got {tuple(logits.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError(
            f"logits must hold at least one sample (N >= 1), got {tuple(logits.shape)}"
        )
    checks.check_class_labels(labels, "labels")
    checks.check_same_length(logits, "logits", labels, "labels")
    num_classes = logits.shape[1]
    in_range, finite = checks.all_true(
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
    return _correctness_weights(logits.detach(), labels, checks.working_dtype(logits))


def _correctness_weights(logits: Tensor, labels: Tensor, dtype: torch.dtype) -> CorrectnessWeights:
    correct = (logits.argmax(dim=1) == labels).to(dtype)
    accuracy = correct.mean()
    weights = torch.where(correct > 0, 1.0 - accuracy, accuracy)
    return CorrectnessWeights(correct, weights)


def correctness_aware_objective(
    confidence: Tensor,
    correct: Tensor,
    weighting: Literal["balanced", "split", "none"] = "balanced",
    accuracy: float | Tensor | None = None,
) -> CalibrationLossOutput:
    """The CA loss from top-label confidences and correctness: the formula of the module docstring.

    :func:`correctness_aware_loss` computes ``confidence`` and ``correct`` from calibrated logits
    and calls this; a fit on cached logits (:func:`tempered_confidence`) calls it directly.

    Args:
        confidence: (N,) top-label confidences :math:`c_i` in [0, 1] (differentiable).
        correct: (N,) correctness :math:`y_i` in {0, 1} (a constant), the dtype of ``confidence``.
        weighting: ``"balanced"``, ``"split"`` or ``"none"`` (see the module docstring).
        accuracy: the :math:`a` of ``weighting="split"`` in [0, 1]; must be None otherwise.

    Returns:
        ``(loss, accuracy, confidence)``: the loss, the mean of ``correct`` and the mean
        confidence (both without gradient).
    """
    checks.check_choice(weighting, "weighting", CA_WEIGHTINGS)
    if (weighting == "split") != (accuracy is not None):
        raise ValueError(
            'accuracy must be given with weighting="split" (the calibration split\'s accuracy) '
            f"and only then, got weighting={weighting!r}, accuracy={accuracy!r}"
        )
    squared = (confidence - correct) ** 2
    if weighting == "none":
        loss = squared.mean()
    else:
        if weighting == "split":
            if isinstance(accuracy, Tensor):
                a = accuracy.detach().to(confidence.dtype)
            else:
                a = torch.tensor(
                    checks.check_float(accuracy, "accuracy", minimum=0.0, maximum=1.0),
                    dtype=confidence.dtype,
                    device=confidence.device,
                )
        else:
            a = correct.mean()
        weights = torch.where(correct > 0, 1.0 - a, a)
        total = weights.sum()
        # The weights are exactly 0 for every sample iff the batch is all correct or wrong.
        weighted = (weights * squared).sum() / torch.where(total > 0, total, 1.0)
        loss = torch.where(total > 0, weighted, squared.mean())
    return CalibrationLossOutput(loss, correct.mean(), confidence.detach().mean())


def _objective_coefficients(
    correct: Tensor,
    sizes: list[int],
    weighting: Literal["balanced", "split", "none"],
    accuracy: Tensor | None,
) -> Tensor:
    """Per-row coefficients :math:`k_i = 2 w_i / W_b` of :func:`correctness_aware_objective`
    for ``correct`` cut into consecutive batches of ``sizes`` (one epoch of a fit, computed
    once): in batch b, with :math:`\\delta_i = c_i - y_i`, the objective is
    :math:`L_b = \\frac12 \\sum_i k_i \\delta_i^2` and its gradient in confidence
    :math:`\\partial L_b / \\partial c_i = k_i \\delta_i` (a fitting step needs two O(B) ops).

    :math:`w_i` are the module docstring's weights from each batch's accuracy (``"balanced"``)
    or from ``accuracy`` (``"split"``, a 0-dim tensor of ``correct``'s dtype; None otherwise),
    :math:`W_b = \\sum_{i \\in b} w_i`; ``"none"`` and the all-correct / all-wrong fallback
    (:math:`W_b = 0`) have every :math:`w_i = 1` and :math:`W_b` = the batch size. No checks.
    """
    device, dtype = correct.device, correct.dtype
    counts = torch.tensor(sizes, device=device)
    batch = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
    counts = counts.to(dtype)
    if weighting == "none":
        return (2.0 / counts)[batch]
    if accuracy is None:  # each batch's accuracy: sums of 0 / 1 are exact
        a = torch.zeros(len(sizes), dtype=dtype, device=device).index_add_(0, batch, correct)
        a = (a / counts)[batch]
    else:
        a = accuracy.to(dtype)
    weights = torch.where(correct > 0, 1.0 - a, a)
    totals = torch.zeros(len(sizes), dtype=dtype, device=device).index_add_(0, batch, weights)
    positive = totals > 0
    weights = torch.where(positive[batch], weights, 1.0)
    return 2.0 * weights / torch.where(positive, totals, counts)[batch]


def correctness_aware_loss(
    logits: Tensor,
    labels: Tensor,
    weighting: Literal["balanced", "split", "none"] = "balanced",
    accuracy: float | Tensor | None = None,
) -> CalibrationLossOutput:
    """Correctness-aware loss of a batch of calibrated logits; see the module docstring.

    Args:
        logits: (N, C) CALIBRATED logits, e.g. :math:`z_0 / T(x)`; finite, any float dtype.
            bf16 / fp16 (and autocast) are computed in float32, float64 stays float64.
        labels: (N,) integer class indices in [0, C).
        weighting: ``"balanced"`` (the paper's class-balance weights :math:`w_i` from the batch's
            accuracy), ``"split"`` (the same weights from a given ``accuracy``) or ``"none"``
            (the plain mean of :math:`(c_i - y_i)^2`).
        accuracy: :math:`a` for ``weighting="split"``, in [0, 1].

    Returns:
        ``(loss, accuracy, confidence)``. Gradient flows through the confidences :math:`c_i`
        only; the correctness :math:`y_i` and the weights :math:`w_i` are constants.
        All-correct or all-wrong batches (:math:`\\sum_i w_i = 0`) give the unweighted mean of
        :math:`(c_i - y_i)^2`, never NaN.

    Raises:
        ValueError: naming ``logits``, ``labels``, ``weighting`` or ``accuracy`` on a wrong
            shape, dtype, value range or option.
    """
    checks.check_choice(weighting, "weighting", CA_WEIGHTINGS)
    _check_logits_labels(logits, labels)
    dtype = checks.working_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        correct = (z.detach().argmax(dim=1) == labels).to(dtype)
        pred = z.detach().argmax(dim=1, keepdim=True)
        confidence = torch.softmax(z, dim=1).gather(1, pred).squeeze(1)
        return correctness_aware_objective(confidence, correct, weighting, accuracy)


LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))


def _confidence_and_moment(scaled: Tensor, work: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(c, m)`` with :math:`e_{ik} = 2^{s_{ik}}`, :math:`c_i = 1 / \\sum_k e_{ik}` and
    :math:`m_i = \\sum_k e_{ik} s_{ik}`, for ``scaled`` :math:`s_{ik} = b_{ik} / T_i`, the
    base-2 shifted logits :math:`b = d \\log_2 e` (row max 0) over the temperature: four
    element-wise ops over ``s`` (exp2, sum, multiply, sum), into ``work`` (the shape of ``s``,
    overwritten) when given. No autograd."""
    e = torch.exp2(scaled) if work is None else torch.exp2(scaled, out=work)
    total = e.sum(dim=1)
    moment = e.mul_(scaled).sum(dim=1)
    return total.reciprocal(), moment


def _confidence_vjp(
    grad: Tensor, confidence: Tensor, moment: Tensor, temperature: Tensor
) -> Tensor:
    """:math:`g_i \\, \\partial c_i / \\partial T_i` with
    :math:`\\partial c_i / \\partial T_i = c_i^2 \\ln 2 \\sum_k e_{ik} b_{ik} / T_i^2
    = \\ln 2 \\, c_i^2 m_i / T_i` (:math:`m` from :func:`_confidence_and_moment`): O(N),
    nothing over the classes."""
    return (grad * moment) * (confidence * confidence / temperature) * math.log(2.0)


class _TemperedConfidence(torch.autograd.Function):
    """:func:`_confidence_and_moment`'s confidence of ``base2 / T`` with its closed-form
    gradient :func:`_confidence_vjp`: the (N, C) work is done once, forward; the backward is
    O(N)."""

    @staticmethod
    def forward(ctx: Any, base2: Tensor, temperature: Tensor, work: Tensor | None) -> Tensor:
        confidence, moment = _confidence_and_moment(base2 / temperature[:, None], work)
        ctx.save_for_backward(confidence, moment, temperature)
        return confidence

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        confidence, moment, temperature = ctx.saved_tensors
        return None, _confidence_vjp(grad, confidence, moment, temperature), None


def tempered_confidence(
    shifted_logits: Tensor, temperature: Tensor, base: Literal["e", "2"] = "e"
) -> Tensor:
    """Top-label confidence :math:`\\max_k \\mathrm{softmax}(z_i / T_i)_k` of FROZEN logits.

    ``shifted_logits`` are :math:`d_i = z_i - \\max_k z_{ik}` (every row's maximum exactly 0:
    compute them once per cached split); then :math:`c_i = 1 / \\sum_k \\exp(d_{ik} / T_i)`
    (the predicted class is the same for every :math:`T_i > 0`). Gradient flows to
    ``temperature`` only, in closed form (five element-wise passes forward, none backward):
    the value of ``softmax(z / T).max(1)`` to float rounding, with no (N, C) softmax backward.
    With ``base="2"``, ``shifted_logits`` are given as :math:`d \\log_2 e` (a fit multiplies
    once, not every step).

    Args:
        shifted_logits: (N, C) floating-point, every row's maximum 0; no gradient.
        temperature: (N,) positive temperatures of the same dtype and device.
        base: ``"e"`` (natural-log logits) or ``"2"`` (already multiplied by log2(e)).
    """
    checks.check_tensor(shifted_logits, "shifted_logits", 2, "(N, C)")
    checks.check_floating(shifted_logits, "shifted_logits")
    checks.check_tensor(temperature, "temperature", 1, "(N,)")
    checks.check_same_length(shifted_logits, "shifted_logits", temperature, "temperature")
    checks.check_choice(base, "base", ("e", "2"))
    if temperature.dtype != shifted_logits.dtype:
        raise ValueError(
            f"temperature must have the dtype of shifted_logits ({shifted_logits.dtype}), got "
            f"{temperature.dtype}"
        )
    if shifted_logits.shape[0]:
        row_max_zero, positive = checks.all_true(
            (shifted_logits.detach().amax(dim=1) == 0).all(),
            ((temperature.detach() > 0) & torch.isfinite(temperature.detach())).all(),
        )
        if not row_max_zero:
            raise ValueError(
                "shifted_logits must have every row's maximum exactly 0: pass "
                "logits - logits.max(dim=1, keepdim=True).values"
            )
        if not positive:
            raise ValueError("temperature must be finite and > 0 for every row")
    base2 = shifted_logits.detach()
    base2 = base2 * LOG2_E if base == "e" else base2
    return _TemperedConfidence.apply(base2, temperature, None)


def _tempered_confidence_into(base2: Tensor, temperature: Tensor, work: Tensor) -> Tensor:
    """:func:`tempered_confidence` of base-2 shifted logits with a preallocated ``work``
    buffer of their shape (no checks: the fitting loop's inner call)."""
    return _TemperedConfidence.apply(base2, temperature, work)


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
    dtype = checks.working_dtype(logits)
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
    dtype = checks.working_dtype(logits)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(dtype)
        probs = torch.softmax(z, dim=1)
        onehot = F.one_hot(labels.long(), probs.shape[1]).to(dtype)
        loss = ((probs - onehot) ** 2).sum(dim=1).mean()
        return CalibrationLossOutput(loss, *_summary(z, labels))


class CorrectnessAwareLoss(nn.Module):
    """:func:`correctness_aware_loss` as a module (``forward(logits, labels)``)."""

    def __init__(
        self,
        weighting: Literal["balanced", "split", "none"] = "balanced",
        accuracy: float | None = None,
    ) -> None:
        super().__init__()
        self.weighting = checks.check_choice(weighting, "weighting", CA_WEIGHTINGS)
        self.accuracy = accuracy

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return correctness_aware_loss(
            logits, labels, weighting=self.weighting, accuracy=self.accuracy
        )


class CalibrationCrossEntropy(nn.Module):
    """:func:`calibration_cross_entropy` as a module (``forward(logits, labels)``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return calibration_cross_entropy(logits, labels)


class CalibrationMSE(nn.Module):
    """:func:`calibration_mse` as a module (``forward(logits, labels)``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> CalibrationLossOutput:
        return calibration_mse(logits, labels)
