"""The calibration metrics as ``torchmetrics.Metric`` classes, exact across batches and ranks.

State design: nothing is ever an average of per-batch values.

* Equal-width binned metrics keep per-bin SUMS (count, sum of confidences, sum of correctness)
  with ``dist_reduce_fx="sum"``: exact, O(n_bins) memory (O(C n_bins) for class-wise).
* Brier score and NLL keep a float64 sum and an int64 count (sum-reduced).
* Equal-mass bins and the AUROC depend on the ranks of ALL confidences, so they keep one float64
  per sample (``dist_reduce_fx="cat"``): the confidence, negated for a wrong prediction (the
  sign bit carries correctness, -0.0 included), i.e. 8 bytes per sample.

``compute()`` equals the functional metric on the concatenation of every ``update()`` (on every
rank after sync), up to float64 summation order. Updates may be empty (N = 0); ``compute()``
with no sample at all warns and returns NaN. Floating states are gathered as float64, so a rank
that saw no data (whose empty list state torchmetrics gathers in the default dtype) does not break
the all-gather.

Values are returned as float32 scalars.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_losses.checks import check_positive_int
from lightning_losses.metrics._checks import check_options, check_probs_labels
from lightning_losses.metrics.calibration import (
    Binning,
    BinSums,
    Norm,
    _auroc,
    _brier_sum,
    _confidences_and_correct,
    _nll_sum,
    calibration_bins,
    calibration_error_from_bins,
    classwise_bins,
)

_ACC = torch.float64
_OUT = torch.float32


def gather_as_float64(result: Tensor, group: Any | None = None) -> list[Tensor]:
    """torchmetrics' ``gather_all_tensors`` with floating tensors cast to float64 first."""
    if result.is_floating_point():
        result = result.to(_ACC)
    return gather_all_tensors(result, group=group)


class _CalibrationMetric(Metric):
    """Shared plumbing: input checks, exact sum states, sign-encoded per-sample states."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", gather_as_float64)
        super().__init__(**kwargs)
        if not isinstance(validate_args, bool):
            raise ValueError(f"validate_args must be a bool, got {validate_args!r}")
        self.validate_args = validate_args

    def _check(self, probs: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
        check_probs_labels(
            probs,
            labels,
            num_classes=num_classes,
            allow_empty=True,
            check_values=self.validate_args,
        )

    def _add_sum_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

    def _accumulate(self, name: str, value: Tensor) -> None:
        # `.to(value.dtype)`: a float64 state that a precision plugin cast down at setup (when it
        # was still zero) is restored before anything is added to it.
        setattr(self, name, getattr(self, name).to(value.dtype) + value)

    def _append_per_sample(self, confidence: Tensor, correct: Tensor) -> None:
        self.signed_confidence.append(torch.where(correct, confidence, -confidence))

    def _per_sample(self) -> tuple[Tensor, Tensor] | None:
        state = self.signed_confidence
        if isinstance(state, list) and not state:
            return None
        signed = dim_zero_cat(state).to(_ACC)
        if signed.numel() == 0:
            return None
        return signed.abs(), ~torch.signbit(signed)

    def _nan_without_samples(self) -> Tensor:
        warnings.warn(
            f"{type(self).__name__}.compute() has no samples (no non-empty update on any rank); "
            "returning NaN",
            UserWarning,
            stacklevel=3,
        )
        return torch.tensor(math.nan, dtype=_OUT, device=self.device)


class CalibrationError(_CalibrationMetric):
    """Top-label calibration error; see :func:`~lightning_losses.metrics.calibration_error`.

    Args:
        n_bins: number of bins M.
        binning: ``"uniform"`` (equal width; state: per-bin sums, O(M)) or ``"quantile"``
            (adaptive ECE, equal mass; state: one float64 per sample).
        norm: ``"l1"`` (ECE), ``"l2"`` (RMS calibration error) or ``"max"`` (MCE).
        validate_args: run the value checks on every update (finite, in [0, 1], rows summing to
            1, label range: one pass and one device sync). Shapes and dtypes are always checked.
        kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    plot_upper_bound = 1.0

    def __init__(
        self,
        n_bins: int = 15,
        binning: Binning = "uniform",
        norm: Norm = "l1",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(validate_args, **kwargs)
        check_options(n_bins, binning, norm)
        self.n_bins = n_bins
        self.binning = binning
        self.norm = norm
        if binning == "uniform":
            self._add_sum_state("count", (n_bins,), torch.int64)
            self._add_sum_state("sum_confidence", (n_bins,), _ACC)
            self._add_sum_state("sum_correct", (n_bins,), _ACC)
        else:
            self.add_state("signed_confidence", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: ``probs`` (N, C) probabilities, ``labels`` (N,) class indices."""
        self._check(probs, labels)
        confidence, correct = _confidences_and_correct(probs, labels)
        if self.binning == "uniform":
            bins = calibration_bins(confidence, correct, self.n_bins, "uniform")
            self._accumulate("count", bins.count)
            self._accumulate("sum_confidence", bins.sum_confidence)
            self._accumulate("sum_correct", bins.sum_correct)
        else:
            self._append_per_sample(confidence, correct)

    def compute(self) -> Tensor:
        """The calibration error over every sample seen (float32 scalar)."""
        if self.binning == "uniform":
            bins = BinSums(self.count, self.sum_confidence.to(_ACC), self.sum_correct.to(_ACC))
            if int(bins.count.sum()) == 0:
                return self._nan_without_samples()
        else:
            per_sample = self._per_sample()
            if per_sample is None:
                return self._nan_without_samples()
            bins = calibration_bins(*per_sample, self.n_bins, "quantile")
        return calibration_error_from_bins(bins, self.norm).to(_OUT)


class ClasswiseCalibrationError(_CalibrationMetric):
    """Class-wise calibration error; see
    :func:`~lightning_losses.metrics.classwise_calibration_error`.

    State: per-class, per-bin sums of shape (num_classes, n_bins), sum-reduced.

    Args:
        num_classes: C (the state's size depends on it).
        n_bins: number of equal-width bins per class.
        norm: ``"l1"``, ``"l2"`` or ``"max"``.
        validate_args: see :class:`CalibrationError`.
    """

    plot_upper_bound = 1.0

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        norm: Norm = "l1",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(validate_args, **kwargs)
        check_positive_int(num_classes, "num_classes")
        check_options(n_bins, "uniform", norm)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.norm = norm
        shape = (num_classes, n_bins)
        self._add_sum_state("count", shape, torch.int64)
        self._add_sum_state("sum_prob", shape, _ACC)
        self._add_sum_state("sum_label", shape, _ACC)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: ``probs`` (N, num_classes) probabilities, ``labels`` (N,)."""
        self._check(probs, labels, num_classes=self.num_classes)
        bins = classwise_bins(probs, labels, self.n_bins)
        self._accumulate("count", bins.count)
        self._accumulate("sum_prob", bins.sum_confidence)
        self._accumulate("sum_label", bins.sum_correct)

    def compute(self) -> Tensor:
        """The class-wise calibration error over every sample seen (float32 scalar)."""
        if int(self.count[0].sum()) == 0:
            return self._nan_without_samples()
        bins = BinSums(self.count, self.sum_prob.to(_ACC), self.sum_label.to(_ACC))
        return calibration_error_from_bins(bins, self.norm).mean().to(_OUT)


class _SampleMean(_CalibrationMetric):
    """The mean over every sample seen of a per-sample value: a float64 sum named
    :attr:`_sum_state` and an int64 count (both sum-reduced); ``compute()`` returns a float32
    scalar (NaN, with a warning, before any sample)."""

    _sum_state: str

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(validate_args, **kwargs)
        self._add_sum_state(self._sum_state, (), _ACC)
        self._add_sum_state("count", (), torch.int64)

    def _batch_sum(self, probs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: ``probs`` (N, C) probabilities, ``labels`` (N,) class indices."""
        self._check(probs, labels)
        self._accumulate(self._sum_state, self._batch_sum(probs, labels))
        self._accumulate("count", torch.tensor(probs.shape[0], device=self.count.device))

    def compute(self) -> Tensor:
        """The mean over every sample seen (float32 scalar)."""
        if int(self.count) == 0:
            return self._nan_without_samples()
        return (getattr(self, self._sum_state).to(_ACC) / self.count).to(_OUT)


class BrierScore(_SampleMean):
    """Brier score; see :func:`~lightning_losses.metrics.brier_score`.

    State: float64 sum of per-sample squared errors and an int64 count (sum-reduced).

    Args:
        top_label: ``False`` for the multi-class Brier score (in [0, 2]), ``True`` for the
            top-label one (in [0, 1]).
        validate_args: see :class:`CalibrationError`.
    """

    _sum_state = "sum_squared_error"

    def __init__(self, top_label: bool = False, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(validate_args, **kwargs)
        if not isinstance(top_label, bool):
            raise ValueError(f"top_label must be a bool, got {top_label!r}")
        self.top_label = top_label

    def _batch_sum(self, probs: Tensor, labels: Tensor) -> Tensor:
        return _brier_sum(probs, labels, self.top_label)


class NegativeLogLikelihood(_SampleMean):
    """Mean NLL of the true class; see :func:`~lightning_losses.metrics.negative_log_likelihood`.

    State: float64 sum of -log p_y and an int64 count (sum-reduced).
    """

    _sum_state = "sum_nll"

    def _batch_sum(self, probs: Tensor, labels: Tensor) -> Tensor:
        return _nll_sum(probs, labels)


class CorrectnessAUROC(_CalibrationMetric):
    """AUROC of confidence for correct vs wrong; see
    :func:`~lightning_losses.metrics.correctness_auroc`.

    State: one float64 per sample (confidence, sign = correctness), cat-reduced. ``compute()``
    warns and returns NaN when every prediction seen is correct, or every one wrong.
    """

    higher_is_better = True
    plot_upper_bound = 1.0

    def __init__(self, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(validate_args, **kwargs)
        self.add_state("signed_confidence", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: ``probs`` (N, C) probabilities, ``labels`` (N,) class indices."""
        self._check(probs, labels)
        self._append_per_sample(*_confidences_and_correct(probs, labels))

    def compute(self) -> Tensor:
        """The AUROC over every sample seen (float32 scalar, NaN if undefined)."""
        per_sample = self._per_sample()
        if per_sample is None:
            return self._nan_without_samples()
        return _auroc(*per_sample)
