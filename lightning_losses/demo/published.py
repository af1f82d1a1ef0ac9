"""Per paper: what it claims, under which protocol, and what we measured under that protocol.

The demo's own runs are small variants of the papers' experiments (its report names them so).
The measurements under the papers' protocols come from the committed studies,
``benchmarks/opl_noise.py`` and ``benchmarks/calibration_study.py``, whose sections in
``docs/RESULTS.md`` hold every table; they are quoted here, not re-run (each takes minutes to
hours). ``tests/demo/test_report.py`` checks that every figure below is the one in
``docs/RESULTS.md``.

A verdict is read from a paired 95% interval: "helps" or "hurts" when it excludes 0 (in the
direction the metric's better side says), else "no detectable difference".
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

__all__ = [
    "CALIBRATION",
    "OPL",
    "Measured",
    "Paper",
    "interval_cell",
    "paired_interval",
    "verdict",
]

RESULTS = "docs/RESULTS.md"


class Measured(NamedTuple):
    """A paired difference measured under a paper's protocol: ``mean [low, high]``."""

    what: str
    mean: float
    low: float
    high: float
    digits: int  # decimals as docs/RESULTS.md prints them
    lower_is_better: bool

    def text(self) -> str:
        d = self.digits
        interval = f"{self.mean:+.{d}f} [{self.low:+.{d}f}, {self.high:+.{d}f}]"
        return f"{self.what}: {interval}, {verdict(self.low, self.high, self.lower_is_better)}"


class Paper(NamedTuple):
    """A paper's claim, its protocol, ours under it, and where the full tables are."""

    claim: str
    protocol: str
    ours_protocol: str
    measured: tuple[Measured, ...]
    section: str  # the docs/RESULTS.md heading, without its "## "

    def lines(self) -> list[str]:
        """Markdown bullet lines for the demo's report."""
        found = "; ".join(m.text() for m in self.measured)
        return [
            f"- **Paper's claim:** {self.claim}",
            f"- **Paper's protocol:** {self.protocol}",
            f"- **Ours under that protocol** ({self.ours_protocol}): {found}.",
            f'- Full tables: `{RESULTS}`, section "{self.section}" (not re-run by the demo).',
        ]


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    """ "helps" / "hurts" when the interval ``[low, high]`` of a difference excludes 0, else
    "no detectable difference"; ``lower_is_better`` for ECE-like metrics."""
    if not low <= high:
        raise ValueError(f"low must be <= high, got [{low}, {high}]")
    if low > 0:
        return "hurts" if lower_is_better else "helps"
    if high < 0:
        return "helps" if lower_is_better else "hurts"
    return "no detectable difference"


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t interval ``(mean, low, high)``:
    mean ± t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation."""
    from scipy.stats import t  # scikit-learn, which the digits data needs, brings scipy

    n = len(diffs)
    if n < 2:
        raise ValueError(f"diffs must hold at least 2 paired differences, got {n}")
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"diffs must be finite, got {diffs}")
    mean = statistics.fmean(diffs)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def interval_cell(diffs: list[float], lower_is_better: bool, digits: int = 4) -> str:
    """``mean [low, high] | verdict`` of paired differences, a markdown table's two cells (one
    difference: its value, no interval)."""
    if len(diffs) == 1:
        return f"{diffs[0]:+.{digits}f} (one seed: no interval) | -"
    mean, low, high = paired_interval(diffs)
    cell = f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"{cell} | {verdict(low, high, lower_is_better)}"


OPL = Paper(
    claim="adding OPL to the truncated Lq loss (TL) raises test accuracy under 40% label noise: "
    "CIFAR-10 87.62 -> 88.45 (+0.83 points, symmetric) and 82.28 -> 87.02 (+4.74, "
    "class-dependent = pair-flip); no CE vs CE+OPL number under noise is published.",
    protocol="ResNet-18 on CIFAR, TL vs TL+OPL, lambda 0.1, gamma 2, per-pair |cos|, "
    "very probably the best test epoch of one run.",
    ours_protocol="`benchmarks/opl_noise.py`: TL vs TL+OPL with lambda 0.1, gamma 2, per-pair "
    "|cos| on digits (an MLP), 40% noise on the training and validation labels, the epoch chosen "
    "on the noisy validation labels, 5 paired seeds, test-accuracy points, 95% t-interval",
    measured=(
        Measured("TL+OPL − TL, symmetric", -0.39, -2.96, 2.18, 2, False),
        Measured("pair-flip", 3.18, -4.03, 10.38, 2, False),
        Measured("CE+OPL − CE (same protocol), symmetric", 0.78, -1.44, 3.00, 2, False),
        Measured("pair-flip", -1.00, -4.50, 2.50, 2, False),
    ),
    section="OPL under label noise: CE, CE+OPL, TL, TL+OPL on digits (issue 10)",
)

CALIBRATION = Paper(
    claim="the correctness-aware (CA) calibrator is competitive with the best post-hoc methods "
    "on both in-distribution and out-of-distribution test sets.",
    protocol="calibrated on ImageNet-val logits of a ResNet-152 (about 20-25% of the split "
    "wrong), the authors' class-balanced weights, tested on ImageNet-A/-R/-S/-V2 and ObjectNet.",
    ours_protocol="`benchmarks/calibration_study.py`: the authors' weights on digits, a `strong` "
    "(1-3% of the calibration split wrong) and a `weak` (10-22% wrong) classifier, 5 paired "
    "seeds, ECE (15 bins) of CA minus temperature scaling, in distribution (ID) and under four "
    "corruptions at severity 3, 95% t-interval; lower is better",
    measured=(
        Measured("ID, strong", 0.0782, 0.0343, 0.1222, 4, True),
        Measured("ID, weak", 0.1322, 0.1209, 0.1434, 4, True),
        Measured("shifted, strong", -0.1090, -0.2048, -0.0131, 4, True),
        Measured("shifted, weak", -0.0818, -0.1495, -0.0140, 4, True),
        Measured(
            "shifted, CA minus no calibration at all, strong", -0.050, -0.101, 0.002, 3, True
        ),  # fmt: skip
        Measured("weak", -0.001, -0.017, 0.014, 3, True),
    ),
    section="Calibration study: CA variants and baselines, two classifier error rates",
)
