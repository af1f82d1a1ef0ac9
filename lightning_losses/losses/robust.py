"""Noise-robust classification losses: generalized cross-entropy and the truncated Lq loss.

Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
Labels" (NeurIPS 2018). With :math:`p_y = \\mathrm{softmax}(z)_y` the probability of the given
label,

.. math::

    \\mathcal{L}_q(p_y) = \\frac{1 - p_y^{\\,q}}{q}, \\qquad q \\in (0, 1],

which tends to cross-entropy :math:`-\\log p_y` as :math:`q \\to 0` and is the mean absolute
error :math:`1 - p_y` at :math:`q = 1`. The *truncated* Lq loss caps the loss of a sample at
:math:`\\mathcal{L}_q(k)`; the authors train it by pruning: a per-sample weight
:math:`w_i \\in \\{0, 1\\}`, recomputed from time to time as :math:`w_i = [p_{y_i}(x_i) > k]`,
and the per-sample loss

.. math::

    \\ell_i = w_i \\big(\\mathcal{L}_q(p_{y_i}) - \\mathcal{L}_q(k)\\big),

averaged over the batch (pruned samples count as 0 in the mean, as in the authors' code).

Both are computed from ``log_softmax`` in float32 at least (:math:`p^q = e^{q \\log p}` and
:math:`1 - p^q = -\\mathrm{expm1}(q \\log p)`, exact for small q and tiny p).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.checks import (
    all_true,
    check_class_labels,
    check_float,
    check_floating,
    check_tensor,
    working_dtype,
)

__all__ = [
    "GCEOutput",
    "TruncatedLqOutput",
    "generalized_cross_entropy",
    "lq_of",
    "truncated_lq_loss",
]


class GCEOutput(NamedTuple):
    """``loss``: the mean Lq loss; ``label_probability``: the mean of p_y (no gradient)."""

    loss: Tensor
    label_probability: Tensor


class TruncatedLqOutput(NamedTuple):
    """``loss``; ``label_probability``: mean p_y; ``kept``: fraction of w_i = 1 (no gradient)."""

    loss: Tensor
    label_probability: Tensor
    kept: Tensor


def _check_q(q: float) -> float:
    return check_float(q, "q", minimum=0.0, maximum=1.0, strict_minimum=True)


def _check_k(k: float) -> float:
    return check_float(k, "k", minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True)


def lq_of(p: float | Tensor, q: float) -> float | Tensor:
    """:math:`(1 - p^q) / q` of a probability (float or tensor), e.g. the truncation constant."""
    if isinstance(p, Tensor):
        return -torch.expm1(q * torch.log(p)) / q
    return -math.expm1(q * math.log(p)) / q


def _log_label_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """log p_y per sample, in the working dtype, after the input checks."""
    check_floating(check_tensor(logits, "logits", 2, "(B, C)"), "logits")
    batch, num_classes = logits.shape
    check_class_labels(labels, "labels", length=batch)
    if batch == 0:
        raise ValueError("logits is an empty batch (B = 0); the loss needs at least one row")
    if num_classes < 2:
        raise ValueError(f"logits must have C >= 2 classes, got shape {tuple(logits.shape)}")
    (in_range,) = all_true(((labels >= 0) & (labels < num_classes)).all())
    if not in_range:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    dtype = working_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = F.log_softmax(logits.to(dtype), dim=1)
        return log_p.gather(1, labels.to(torch.int64).unsqueeze(1)).squeeze(1)


def _check_finite(loss: Tensor) -> None:
    # A NaN / inf logit makes its row's log_softmax non-finite, hence the mean: one scalar check.
    if not torch.isfinite(loss.detach()):
        raise ValueError("logits contain NaN or inf; check the network's output")


def generalized_cross_entropy(logits: Tensor, labels: Tensor, q: float = 0.7) -> GCEOutput:
    """Mean generalized cross-entropy :math:`(1 - p_y^q)/q` (Zhang & Sabuncu 2018).

    Args:
        logits: (B, C) unnormalised scores, any float dtype (bf16 / fp16 computed in float32).
        labels: (B,) integer class indices in ``[0, C)``.
        q: in ``(0, 1]``; q -> 0 is cross-entropy, q = 1 is MAE (``1 - p_y``). 0.7 in the paper.

    Returns:
        :class:`GCEOutput` ``(loss, label_probability)``.
    """
    _check_q(q)
    log_py = _log_label_probability(logits, labels)
    per_sample = -torch.expm1(q * log_py) / q
    loss = per_sample.mean()
    _check_finite(loss)
    return GCEOutput(loss, log_py.detach().exp().mean())


def truncated_lq_loss(
    logits: Tensor,
    labels: Tensor,
    q: float = 0.7,
    k: float = 0.5,
    weights: Tensor | None = None,
) -> TruncatedLqOutput:
    """Truncated Lq loss with pruning weights: mean of :math:`w_i((1 - p_y^q)/q - (1 - k^q)/q)`.

    Args:
        logits: (B, C) unnormalised scores, any float dtype (bf16 / fp16 computed in float32).
        labels: (B,) integer class indices in ``[0, C)``.
        q: in ``(0, 1]`` (0.7 in the paper).
        k: the truncation threshold on p_y, in ``(0, 1)`` (0.5 in the paper).
        weights: (B,) per-sample weights with values in {0, 1} (bool or any real dtype); None
            means all 1 (then the loss is the GCE minus the constant :math:`(1 - k^q)/q`).

    Returns:
        :class:`TruncatedLqOutput` ``(loss, label_probability, kept)``.
    """
    _check_q(q)
    _check_k(k)
    log_py = _log_label_probability(logits, labels)
    shifted = -torch.expm1(q * log_py) / q - lq_of(k, q)
    if weights is None:
        w = torch.ones_like(shifted)
    else:
        check_tensor(weights, "weights", 1, "(B,)")
        if weights.shape[0] != shifted.shape[0]:
            raise ValueError(
                f"weights must have {shifted.shape[0]} entries (one per sample), "
                f"got {weights.shape[0]}"
            )
        if weights.is_complex():
            raise ValueError(f"weights must be real with values in {{0, 1}}, got {weights.dtype}")
        w = weights.to(device=shifted.device, dtype=shifted.dtype)
        (binary,) = all_true(((w == 0) | (w == 1)).all())
        if not binary:
            raise ValueError(
                "weights must hold only 0 and 1 (w_i = 1 iff p_y > k when last pruned), got "
                f"values in [{float(w.min())}, {float(w.max())}]"
            )
    loss = (w * shifted).mean()
    _check_finite(loss)
    return TruncatedLqOutput(loss, log_py.detach().exp().mean(), w.detach().mean())
