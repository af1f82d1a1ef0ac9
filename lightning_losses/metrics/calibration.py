"""Calibration metrics of class probabilities, as plain functions.

Inputs are always PROBABILITIES ``probs`` (N, C) (rows on the simplex) and integer ``labels``
(N,); logits are rejected with a hint instead of being softmaxed silently. Write
:math:`c_i = \\max_k p_{ik}` (the top-label confidence), :math:`\\hat y_i = \\arg\\max_k p_{ik}`
(ties broken by :func:`torch.max`) and :math:`a_i = 1[\\hat y_i = y_i]` (correctness).

Binned calibration error of (confidence, correctness) pairs over bins :math:`B_1 .. B_M`, with
:math:`n_b = |B_b|`, :math:`\\mathrm{acc}_b = \\frac{1}{n_b}\\sum_{i \\in B_b} a_i` and
:math:`\\mathrm{conf}_b = \\frac{1}{n_b}\\sum_{i \\in B_b} c_i`:

.. math::

    \\mathrm{ECE}_{l1} = \\sum_b \\frac{n_b}{N}\\,|\\mathrm{acc}_b - \\mathrm{conf}_b|,
    \\qquad
    \\mathrm{ECE}_{l2} = \\Big(\\sum_b \\frac{n_b}{N}(\\mathrm{acc}_b - \\mathrm{conf}_b)^2
    \\Big)^{1/2}, \\qquad
    \\mathrm{MCE} = \\max_{b:\\, n_b > 0} |\\mathrm{acc}_b - \\mathrm{conf}_b|.

Empty bins carry zero weight and are skipped by the max (not weighted by their share).

* ``binning="uniform"`` (equal-width bins): edges :math:`e_b = b / M`, bin b holds
  :math:`c \\in (e_b, e_{b+1}]`; :math:`c = 0` goes to the first bin and :math:`c = 1` to the
  last one (no hidden extra bin). Edges are exact float64 ``b / M`` and confidences are compared
  in float64, so a float32 confidence is binned by its exact value.
* ``binning="quantile"``: the ADAPTIVE ECE, i.e. equal-mass bins (Nguyen & O'Connor 2015,
  Mukhoti et al. 2020). Samples are sorted by confidence and rank :math:`r \\in [0, N)` goes to
  group :math:`\\lfloor r M / N \\rfloor`: every group holds :math:`\\lfloor N/M \\rfloor` or
  :math:`\\lceil N/M \\rceil` samples, and with N < M there are N groups of one sample. Ties never
  collapse a bin; tied confidences are exchangeable, so a run of equal confidences that straddles
  a group boundary gives each group the run's mean correctness for the ranks it holds there. The
  value therefore does not depend on the order of the samples. This is NOT netcal's "ACE"
  (an unweighted average over bins).

Binned estimators are biased upwards for small N (the gap of a bin with few samples is noisy):
report ``n_bins`` and N with the number. Top-label, class-wise and binary calibration errors are
different quantities; see :func:`classwise_calibration_error`.

All functions work in float64 internally and return a float32 scalar tensor on the input's
device.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_losses.metrics._checks import check_norm, check_options, check_probs_labels

Binning = Literal["uniform", "quantile"]
Norm = Literal["l1", "l2", "max"]

#: ``negative_log_likelihood`` clamps p_y from below at the smallest normal float32 number, so a
#: probability of exactly 0 costs -log(1.18e-38) = 87.3 nats instead of inf.
NLL_MIN_PROB: float = torch.finfo(torch.float32).tiny

_ACC = torch.float64  # accumulation dtype
_OUT = torch.float32  # dtype of every returned value


class BinSums(NamedTuple):
    """Per-bin sums, the exact sufficient statistics of a binned calibration error.

    ``count`` (int64) is :math:`n_b`, ``sum_confidence`` :math:`\\sum_{i \\in B_b} c_i` and
    ``sum_correct`` :math:`\\sum_{i \\in B_b} a_i` (both float64). The last dimension indexes the
    bins; leading dimensions (e.g. classes) are allowed. Sums over disjoint data add up.
    """

    count: Tensor
    sum_confidence: Tensor
    sum_correct: Tensor


def confidences_and_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence (float64, (N,)) and correctness (bool, (N,)) of validated inputs.

    Raises ``ValueError`` if ``probs`` are not (N, C) probabilities or ``labels`` not (N,)
    class indices in range.
    """
    check_probs_labels(probs, labels)
    return _confidences_and_correct(probs, labels)


def _confidences_and_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    confidence, predicted = probs.detach().max(dim=1)
    return confidence.to(_ACC), predicted == labels


def uniform_bin_edges(n_bins: int, device: torch.device | str | None = None) -> Tensor:
    """The ``n_bins + 1`` edges ``b / n_bins`` in float64 (exactly rounded)."""
    return torch.arange(n_bins + 1, dtype=_ACC, device=device) / n_bins


def uniform_bin_index(values: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each value in [0, 1]: b such that ``e_b < v <= e_{b+1}``, 0 -> 0.

    Values are compared with the float64 edges in float64; any shape; int64 result in
    [0, n_bins - 1] (1.0 goes to the last bin).
    """
    inner = uniform_bin_edges(n_bins, values.device)[1:-1]
    # bucketize(right=False) counts the inner edges strictly below v: e_b < v <= e_{b+1} -> b.
    return torch.bucketize(values.to(_ACC), inner, right=False)


def calibration_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = 15, binning: Binning = "uniform"
) -> BinSums:
    """Per-bin sums of (confidence, correctness) pairs, shape (n_bins,) each.

    Args:
        confidence: (N,) confidences in [0, 1], any float dtype (used in float64).
        correct: (N,) bool or 0/1 correctness.
        n_bins: number of bins M.
        binning: ``"uniform"`` (equal width) or ``"quantile"`` (equal mass by rank, tie-averaged;
            see the module docstring). With N < M, M - N of the quantile bins stay empty.
    """
    check_options(n_bins, binning)
    if confidence.ndim != 1 or correct.shape != confidence.shape:
        raise ValueError(
            f"confidence and correct must be 1-D tensors of the same shape (N,), got "
            f"{tuple(confidence.shape)} and {tuple(correct.shape)}"
        )
    conf = confidence.detach().to(_ACC)
    corr = correct.detach().to(_ACC)
    if binning == "uniform":
        index = uniform_bin_index(conf, n_bins)
    else:
        conf, order = torch.sort(conf, stable=True)
        corr = _tie_averaged(conf, corr[order])
        n = conf.shape[0]
        index = torch.arange(n, device=conf.device) * n_bins // max(n, 1)
    count = torch.bincount(index, minlength=n_bins)
    zeros = torch.zeros(n_bins, dtype=_ACC, device=conf.device)
    return BinSums(count, zeros.index_add(0, index, conf), zeros.index_add(0, index, corr))


def _tie_averaged(sorted_values: Tensor, weights: Tensor) -> Tensor:
    """Replace each weight by the mean weight of its run of equal ``sorted_values``."""
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    if counts.shape[0] == sorted_values.shape[0]:  # no ties
        return weights
    run_sums = torch.zeros(counts.shape[0], dtype=_ACC, device=weights.device)
    run_sums.index_add_(0, inverse, weights)
    return (run_sums / counts)[inverse]


def calibration_error_from_bins(bins: BinSums, norm: Norm = "l1") -> Tensor:
    """Binned calibration error from per-bin sums; float64, reduced over the last dimension.

    N is the total count along the last dimension. With N = 0 the result is NaN.
    """
    check_norm(norm)
    count = bins.count.to(_ACC)
    total = count.sum(dim=-1)
    diff = bins.sum_correct - bins.sum_confidence  # n_b (acc_b - conf_b)
    nonempty = count > 0
    safe_count = count.clamp_min(1.0)
    if norm == "l1":
        value = diff.abs().sum(dim=-1) / total
    elif norm == "l2":
        value = torch.sqrt((diff.square() / safe_count).sum(dim=-1) / total)
    else:
        gaps = torch.where(nonempty, diff.abs() / safe_count, -math.inf)
        value = gaps.amax(dim=-1)
    return torch.where(total > 0, value, math.nan)


def calibration_error(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 15,
    binning: Binning = "uniform",
    norm: Norm = "l1",
) -> Tensor:
    """Top-label calibration error (ECE / RMS-CE / MCE) of class probabilities.

    ``norm="l1"`` is the ECE, ``"l2"`` the root-mean-square calibration error and ``"max"`` the
    MCE (max over non-empty bins). ``binning="uniform"`` gives equal-width bins,
    ``"quantile"`` the adaptive ECE (equal-mass bins). See the module docstring for the exact
    definitions, bin edges and tie handling.

    Args:
        probs: (N, C) class probabilities (not logits), N >= 1.
        labels: (N,) integer class indices.
        n_bins: number of bins M (15 is the common choice; the CA paper uses 25).
        binning: ``"uniform"`` or ``"quantile"``.
        norm: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
        float32 scalar in [0, 1].
    """
    check_options(n_bins, binning, norm)
    conf, correct = confidences_and_correct(probs, labels)
    bins = calibration_bins(conf, correct, n_bins, binning)
    return calibration_error_from_bins(bins, norm).to(_OUT)


def classwise_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> BinSums:
    """Per-class, per-bin sums (C, n_bins) of (p_c, 1[y = c]) with equal-width bins on p_c.

    No input checks (see :func:`classwise_calibration_error`).
    """
    n, c = probs.shape
    p = probs.detach().to(_ACC)
    index = uniform_bin_index(p, n_bins) + torch.arange(c, device=p.device) * n_bins
    count = torch.bincount(index.flatten(), minlength=c * n_bins)
    sum_p = torch.zeros(c * n_bins, dtype=_ACC, device=p.device)
    sum_p.index_add_(0, index.flatten(), p.flatten())
    hits = index.gather(1, labels.view(n, 1).long()).flatten()  # the bin of p_{i, y_i}
    sum_y = torch.bincount(hits, minlength=c * n_bins).to(_ACC)
    return BinSums(count.view(c, n_bins), sum_p.view(c, n_bins), sum_y.view(c, n_bins))


def classwise_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, norm: Norm = "l1"
) -> Tensor:
    """Class-wise calibration error: the mean over classes of a binary calibration error.

    For each class c, the pairs :math:`(p_{ic}, 1[y_i = c])` over ALL N samples are put in
    equal-width bins on :math:`p_{ic}` (same edges as :func:`calibration_error`), giving

    .. math::

        \\mathrm{CE}_c = \\sum_b \\frac{n_{cb}}{N}\\,\\Big|\\frac{1}{n_{cb}}\\sum_{i \\in B_{cb}}
        1[y_i = c] - \\frac{1}{n_{cb}}\\sum_{i \\in B_{cb}} p_{ic}\\Big|, \\qquad
        \\mathrm{cwCE} = \\frac{1}{C}\\sum_c \\mathrm{CE}_c

    for ``norm="l1"`` (Kull et al. 2019's classwise-ECE); ``"l2"`` and ``"max"`` replace
    :math:`\\mathrm{CE}_c` by the per-class RMS / max gap before the mean over classes. Every
    class is included, also classes absent from ``labels``.

    Returns:
        float32 scalar in [0, 1].
    """
    check_options(n_bins, "uniform", norm)
    check_probs_labels(probs, labels)
    per_class = calibration_error_from_bins(classwise_bins(probs, labels, n_bins), norm)
    return per_class.mean().to(_OUT)


def brier_score(probs: Tensor, labels: Tensor, top_label: bool = False) -> Tensor:
    """Brier score (mean squared error of the probabilities).

    * ``top_label=False`` (multi-class Brier, Brier 1950):
      :math:`\\frac{1}{N}\\sum_i \\sum_k (p_{ik} - 1[y_i = k])^2`, in [0, 2].
    * ``top_label=True`` (the CA paper's Brier): :math:`\\frac{1}{N}\\sum_i (c_i - a_i)^2` with
      the top-label confidence :math:`c_i` and correctness :math:`a_i`, in [0, 1].

    Returns:
        float32 scalar.
    """
    check_probs_labels(probs, labels)
    return (_brier_sum(probs, labels, top_label) / probs.shape[0]).to(_OUT)


def _brier_sum(probs: Tensor, labels: Tensor, top_label: bool) -> Tensor:
    if top_label:
        conf, correct = _confidences_and_correct(probs, labels)
        return (conf - correct.to(_ACC)).square().sum()
    diff = probs.detach().to(_ACC, copy=True)
    diff[torch.arange(diff.shape[0], device=diff.device), labels] -= 1.0
    return diff.square().sum()


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood :math:`-\\frac{1}{N}\\sum_i \\log \\max(p_{i y_i}, \\epsilon)`.

    :math:`\\epsilon` = :data:`NLL_MIN_PROB` (1.18e-38, the smallest normal float32), so a
    probability of exactly 0 gives a large finite 87.3 nats rather than inf. With logits at hand,
    ``torch.nn.functional.cross_entropy(logits, labels)`` is the same quantity without the clamp.

    Returns:
        float32 scalar >= 0.
    """
    check_probs_labels(probs, labels)
    return (_nll_sum(probs, labels) / probs.shape[0]).to(_OUT)


def _nll_sum(probs: Tensor, labels: Tensor) -> Tensor:
    p_true = probs.detach().gather(1, labels.view(-1, 1).long()).flatten().to(_ACC)
    return -torch.log(p_true.clamp_min(NLL_MIN_PROB)).sum()


def correctness_auroc(probs: Tensor, labels: Tensor) -> Tensor:
    """AUROC of the top-label confidence for telling correct (positive) from wrong predictions.

    Rank form (Mann-Whitney U) with mid-ranks, so a tie between a correct and a wrong
    prediction counts 1/2:

    .. math::

        \\mathrm{AUROC} = \\frac{1}{n_+ n_-}\\sum_{i: a_i = 1}\\sum_{j: a_j = 0}
        \\big(1[c_i > c_j] + \\tfrac12 1[c_i = c_j]\\big)
        = \\frac{R_+ - n_+(n_+ + 1)/2}{n_+ n_-},

    with :math:`R_+` the sum of the (mid-)ranks of the correct predictions. Undefined when all
    predictions are correct or all wrong: a ``UserWarning`` is issued and NaN returned.

    Returns:
        float32 scalar in [0, 1] (or NaN).
    """
    conf, correct = confidences_and_correct(probs, labels)
    return _auroc(conf, correct)


def _auroc(confidence: Tensor, correct: Tensor) -> Tensor:
    """Mann-Whitney AUROC of bool ``correct`` by ``confidence``; warns + NaN if undefined."""
    n = confidence.shape[0]
    n_pos = int(correct.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        what = "no samples" if n == 0 else ("all correct" if n_neg == 0 else "all wrong")
        warnings.warn(
            f"correctness AUROC is undefined when predictions are {what} (N={n}); returning NaN",
            UserWarning,
            stacklevel=3,
        )
        return torch.tensor(math.nan, dtype=_OUT, device=confidence.device)
    _, inverse, counts = torch.unique(confidence, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # 0-based first rank of each run of ties
    twice_mid_rank = 2 * starts + counts + 1  # 2x the 1-based mid-rank, an integer
    rank_sum_x2 = twice_mid_rank[inverse][correct].sum()  # exact in int64
    u_x2 = rank_sum_x2 - n_pos * (n_pos + 1)
    return (u_x2.to(_ACC) / (2.0 * n_pos * n_neg)).to(_OUT)
