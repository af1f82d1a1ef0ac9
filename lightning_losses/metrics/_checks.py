"""Input and option checks shared by the functional metrics and the Metric classes.

Every check raises ``ValueError`` naming the argument, the expected shape / dtype / range, and
what was received. The value checks (finite, in [0, 1], rows summing to 1, label range) are
gathered into one tensor so that a GPU input costs a single device-to-host copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_losses.checks import check_positive_int, describe

NORMS: tuple[str, ...] = ("l1", "l2", "max")
BINNINGS: tuple[str, ...] = ("uniform", "quantile")
ROW_SUM_TOL = 1e-3


def row_sum_tolerance(dtype: torch.dtype) -> float:
    """How far a row of ``probs`` may sum from 1: ``max(1e-3, eps(dtype))``.

    1e-3 for float16 / float32 / float64. bfloat16 gets its machine epsilon (7.8e-3): rounding
    float32 softmax rows to bfloat16 moves a row sum by up to 2^-8 = 3.9e-3 (about 40% of random
    10-class rows miss 1e-3), so a stricter check would reject honest probabilities.
    """
    return max(ROW_SUM_TOL, torch.finfo(dtype).eps)


def check_norm(norm: str) -> None:
    """Raise unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_options(n_bins: int, binning: str = "uniform", norm: str = "l1") -> None:
    """Validate the binning options of the calibration errors."""
    check_positive_int(n_bins, "n_bins")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    check_norm(norm)


def check_probs_labels(
    probs: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    allow_empty: bool = False,
    check_values: bool = True,
) -> None:
    """Check that ``probs`` (N, C) are class probabilities and ``labels`` (N,) class indices.

    Args:
        probs: (N, C) floating tensor; finite, in [0, 1], each row summing to 1 within
            :func:`row_sum_tolerance` (summed in at least float32).
        labels: (N,) integer tensor with values in [0, C - 1], on the device of ``probs``.
        num_classes: if given, C must equal it.
        allow_empty: accept N = 0 (a Metric update with an empty batch); the functional
            metrics need at least one sample.
        check_values: run the value checks (one pass over ``probs``, one device sync); the
            shape / dtype checks always run.
    """
    if not isinstance(probs, Tensor) or probs.ndim != 2:
        hint = ""
        if isinstance(probs, Tensor) and probs.ndim == 1:
            hint = "; for a binary problem pass torch.stack([1 - p, p], dim=1)"
        raise ValueError(
            f"probs must be a 2-D tensor of shape (N, C) holding class probabilities, "
            f"got {describe(probs)}{hint}"
        )
    if not probs.is_floating_point():
        raise ValueError(
            f"probs must be a floating-point tensor of probabilities, got dtype {probs.dtype}"
        )
    n, c = probs.shape
    if c < 1:
        raise ValueError(f"probs must have at least one class column (C >= 1), got shape {(n, c)}")
    if num_classes is not None and c != num_classes:
        raise ValueError(
            f"probs must have num_classes={num_classes} columns, got shape {tuple(probs.shape)}"
        )
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor of shape (N,), got {describe(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor of class indices, got dtype {labels.dtype}; "
            "convert one-hot or soft labels with labels.argmax(dim=1)"
        )
    if labels.shape[0] != n:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but probs has {n} rows; they must match"
        )
    if labels.device != probs.device:
        raise ValueError(
            f"labels must be on the device of probs ({probs.device}), got {labels.device}"
        )
    if n == 0:
        if allow_empty:
            return
        raise ValueError(f"probs must hold at least one sample (N >= 1), got shape {(n, c)}")
    if not check_values:
        return

    low, high = torch.aminmax(probs.detach())
    row_sums = probs.detach().sum(dim=1, dtype=torch.promote_types(probs.dtype, torch.float32))
    worst_row = row_sums[(row_sums - 1.0).abs().argmax()]
    label_low, label_high = torch.aminmax(labels)
    stats = torch.stack([t.double() for t in (low, high, worst_row, label_low, label_high)])
    low_v, high_v, row_v, label_low_v, label_high_v = stats.tolist()

    if not (abs(low_v) < float("inf") and abs(high_v) < float("inf")):  # NaN compares False
        raise ValueError(
            "probs contain NaN or inf; expected finite probabilities in [0, 1] "
            "(check the model's output and the softmax)"
        )
    if low_v < 0.0 or high_v > 1.0:
        raise ValueError(
            f"probs must be probabilities in [0, 1], got values in [{low_v:.4g}, {high_v:.4g}]: "
            "this looks like logits; apply probs = logits.softmax(dim=1) first"
        )
    tol = row_sum_tolerance(probs.dtype)
    if not abs(row_v - 1.0) <= tol:
        raise ValueError(
            f"each row of probs must sum to 1 (within {tol:g}), but a row sums to "
            f"{row_v:.6g}: if these are logits or unnormalised scores apply softmax(dim=1) first; "
            "independent per-class (sigmoid / multi-label) scores are not top-label probabilities"
        )
    if label_low_v < 0 or label_high_v >= c:
        raise ValueError(
            f"labels must be class indices in [0, C - 1] = [0, {c - 1}], got values in "
            f"[{int(label_low_v)}, {int(label_high_v)}]"
        )
