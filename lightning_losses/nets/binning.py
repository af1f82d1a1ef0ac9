"""Top-label recalibration baselines: histogram binning and isotonic regression.

Both replace the top-label confidence :math:`c_i = \\max_k \\mathrm{softmax}(z_i)_k` by a fitted
non-decreasing map :math:`g(c_i)` learnt from the calibration split's correctness
:math:`y_i = [\\arg\\max_k z_{ik} = \\ell_i]`:

- :class:`HistogramBinning` (Zadrozny & Elkan 2001): B bins of the confidence (equal-width, or
  equal-mass edges from the calibration split's confidences); :math:`g` is each bin's accuracy
  on the split (an empty bin keeps its centre). Bin ``b`` holds :math:`e_b < c \\le e_{b+1}`,
  confidence 0 in the first bin (the convention of :mod:`lightning_losses.metrics`).
- :class:`IsotonicCalibration` (Zadrozny & Elkan 2002): :math:`g` is the least-squares
  non-decreasing fit of :math:`y` on :math:`c` (pool-adjacent-violators; tied confidences are
  averaged first), linearly interpolated between the fitted points and constant beyond them:
  scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``, which the tests match.

The calibrated probability vector keeps the predicted class and gives it :math:`g(c_i)`; the other
classes share the rest in proportion to their original probabilities,
:math:`q_{ik} = p_{ik} (1 - g(c_i)) / (1 - c_i)` (uniformly when :math:`c_i = 1`). So that the
predicted class stays the argmax (and the accuracy unchanged), its calibrated logit is raised,
where needed, to just above the largest other one (only when :math:`g(c_i)` is below the largest
other share). ``forward`` returns :math:`\\log q` with probabilities floored at the dtype's
smallest normal number, so logits stay finite when a bin's accuracy is 0 or 1. Imports torch only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_losses.checks import check_choice, check_logits, check_positive_int
from lightning_losses.nets.calibrators import PostHocCalibrator

__all__ = ["HistogramBinning", "IsotonicCalibration", "top_label_logits"]


def top_label_logits(logits: Tensor, confidence: Tensor) -> Tensor:
    """Logits whose softmax gives the predicted class ``confidence`` (N,) and the others the rest
    in proportion (see the module docstring); the argmax of ``logits`` is kept."""
    probs = torch.softmax(logits, dim=1)
    top_p, top = probs.max(dim=1)
    c = confidence.to(probs.dtype).clamp(0.0, 1.0)
    rest = (1.0 - top_p).clamp_min(0.0)
    num_classes = logits.shape[1]
    share = torch.where(
        rest[:, None] > 0,
        probs * ((1.0 - c) / torch.where(rest > 0, rest, 1.0))[:, None],
        ((1.0 - c) / (num_classes - 1))[:, None].expand_as(probs),
    )
    tiny = torch.finfo(probs.dtype).tiny
    out = share.clamp_min(tiny).log()
    others = out.scatter(1, top[:, None], -torch.inf).amax(dim=1)
    top_logit = c.clamp_min(tiny).log()
    # Keep the predicted class the argmax: at least a relative 1e-6 above the largest other.
    floor = others + 1e-6 * others.abs().clamp_min(1.0)
    return out.scatter(1, top[:, None], torch.maximum(top_logit, floor)[:, None])


def _confidence_correct(logits: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.detach().to(torch.float64), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(torch.float64) if labels is not None else pred
    return conf, correct


class _TopLabelCalibrator(PostHocCalibrator):
    def _map(self, confidence: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """Calibrated logits (N, C) in at least float32 (see the module docstring)."""
        check_logits(logits)
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(logits, labels)")
        dtype = self._working_dtype(logits)
        with torch.no_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.detach().to(dtype)
            conf = torch.softmax(z.to(torch.float64), dim=1).amax(dim=1)
            return top_label_logits(z, self._map(conf).to(dtype))

    def calibrated_confidence(self, logits: Tensor) -> Tensor:
        """:math:`g(c_i)`, (N,) float64: the calibrated top-label confidences."""
        check_logits(logits)
        conf, _ = _confidence_correct(logits)
        return self._map(conf)


class HistogramBinning(_TopLabelCalibrator):
    """Histogram binning of the top-label confidence (module docstring).

    Args:
        n_bins: B, >= 1.
        binning: ``"uniform"`` (equal-width bins on [0, 1]) or ``"quantile"`` (equal-mass inner
            edges at the calibration split's confidence quantiles; tied edges merged).
    """

    def __init__(self, n_bins: int = 15, binning: Literal["uniform", "quantile"] = "uniform"):
        super().__init__()
        self.n_bins = check_positive_int(n_bins, "n_bins")
        self.binning = check_choice(binning, "binning", ("uniform", "quantile"))
        self.register_buffer("edges", torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64))
        self.register_buffer("bin_values", torch.full((n_bins,), torch.nan, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return not bool(torch.isnan(self.bin_values).any())

    def _bucket(self, confidence: Tensor) -> Tensor:
        inner = self.edges[1:-1].to(confidence)
        return torch.bucketize(confidence, inner, right=False)  # e_b < c <= e_{b+1} -> b

    def _fit(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None) -> None:
        """Bin the split's confidences and store each bin's accuracy."""
        conf, correct = _confidence_correct(logits, labels)
        if self.binning == "uniform":
            edges = torch.linspace(0.0, 1.0, self.n_bins + 1, dtype=torch.float64)
        else:
            quantiles = torch.linspace(0.0, 1.0, self.n_bins + 1, dtype=torch.float64)[1:-1]
            inner = torch.unique(torch.quantile(conf.cpu(), quantiles))
            edges = torch.cat(
                [torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)]
            )
            edges = torch.unique(edges)
        edges = edges.to(conf.device)
        bins = len(edges) - 1
        index = torch.bucketize(conf, edges[1:-1], right=False)
        count = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(
            0, index, torch.ones_like(conf)
        )
        hits = torch.zeros_like(count).index_add_(0, index, correct)
        centres = (edges[:-1] + edges[1:]) / 2
        values = torch.where(count > 0, hits / count.clamp_min(1.0), centres)
        self.edges = edges.to(self.edges.device)
        self.bin_values = values.to(self.bin_values.device)

    def _map(self, confidence: Tensor) -> Tensor:
        c = confidence.to(torch.float64)
        return self.bin_values.to(c.device)[self._bucket(c)]

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, binning={self.binning!r}"


def pool_adjacent_violators(y: Tensor, weights: Tensor) -> Tensor:
    """The weighted least-squares non-decreasing fit of ``y`` (1-D, in order): PAV, O(n)."""
    values: list[float] = []
    masses: list[float] = []
    counts: list[int] = []
    for value, mass in zip(y.tolist(), weights.tolist()):
        values.append(value)
        masses.append(mass)
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v, m, n = values.pop(), masses.pop(), counts.pop()
            total = masses[-1] + m
            values[-1] = (values[-1] * masses[-1] + v * m) / total
            masses[-1] = total
            counts[-1] += n
    out = torch.empty(len(y), dtype=torch.float64)
    start = 0
    for value, n in zip(values, counts):
        out[start : start + n] = value
        start += n
    return out


class IsotonicCalibration(_TopLabelCalibrator):
    """Isotonic regression of correctness on the top-label confidence (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("x_points", torch.empty(0, dtype=torch.float64))
        self.register_buffer("y_points", torch.empty(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.x_points.numel() > 0

    def _fit(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None) -> None:
        """PAV on the split's (confidence, correctness) pairs."""
        conf, correct = _confidence_correct(logits, labels)
        x, inverse = torch.unique(conf.cpu(), sorted=True, return_inverse=True)
        weight = torch.zeros_like(x).index_add_(0, inverse, torch.ones_like(conf.cpu()))
        mean = torch.zeros_like(x).index_add_(0, inverse, correct.cpu()) / weight
        fitted = pool_adjacent_violators(mean, weight).clamp(0.0, 1.0)
        self.x_points = x.to(self.x_points.device)
        self.y_points = fitted.to(self.y_points.device)

    def _map(self, confidence: Tensor) -> Tensor:
        x = self.x_points.to(confidence.device)
        y = self.y_points.to(confidence.device)
        c = confidence.to(torch.float64)
        if len(x) == 1:
            return y.expand_as(c).clone()
        c_clip = c.clamp(x[0], x[-1])
        right = torch.searchsorted(x, c_clip, right=False).clamp(1, len(x) - 1)
        left = right - 1
        span = x[right] - x[left]
        t = (c_clip - x[left]) / span
        return y[left] + t * (y[right] - y[left])

    def extra_repr(self) -> str:
        return f"points={self.x_points.numel()}"
