"""Reliability diagram of top-label confidence (matplotlib is imported inside the function)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_losses.checks import check_positive_int
from lightning_losses.metrics.calibration import (
    calibration_bins,
    calibration_error_from_bins,
    confidences_and_correct,
    uniform_bin_edges,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def reliability_diagram(
    probs: Tensor,
    labels: Tensor,
    n_bins: int = 15,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Accuracy per equal-width confidence bin against the diagonal, with the gap shaded.

    For each non-empty bin b (edges ``b / n_bins``, as in
    :func:`~lightning_losses.metrics.calibration_error`) a bar of height
    :math:`\\mathrm{acc}_b` is drawn, and the gap to the bin's mean confidence
    :math:`\\mathrm{conf}_b` is shaded, so the shaded areas weighted by the bin counts are the
    ECE (given in the legend with M and N). The number of samples per bin is drawn below the
    diagram (or, when ``ax`` is given, as light bars on a secondary axis of ``ax``).

    The figure is built with ``matplotlib.figure.Figure`` (Agg canvas) and never through pyplot:
    it works headless, touches no global backend and is not kept alive by pyplot. Display it in
    a notebook as the cell's value or save it with ``fig.savefig(path)``.

    Args:
        probs: (N, C) class probabilities (not logits).
        labels: (N,) integer class indices.
        n_bins: number of equal-width bins.
        title: axes title.
        ax: draw into these axes (returns their figure) instead of a new two-panel figure.
    """
    check_positive_int(n_bins, "n_bins")
    from matplotlib.figure import Figure

    confidence, correct = confidences_and_correct(probs, labels)
    bins = calibration_bins(confidence, correct, n_bins, "uniform")
    ece = float(calibration_error_from_bins(bins, "l1"))
    count = bins.count.cpu()
    nonempty = count > 0
    safe = count.clamp_min(1).to(torch.float64)
    accuracy = (bins.sum_correct.cpu() / safe)[nonempty].tolist()
    mean_conf = (bins.sum_confidence.cpu() / safe)[nonempty].tolist()
    edges = uniform_bin_edges(n_bins)
    width = 1.0 / n_bins
    centres = ((edges[:-1] + edges[1:]) / 2)[nonempty].tolist()
    n = int(count.sum())

    own_figure = ax is None
    if ax is None:
        fig = Figure(figsize=(5.0, 6.0), layout="constrained")
        ax, hist_ax = fig.subplots(
            2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=True
        )
    else:
        fig = ax.figure
        hist_ax = ax.twinx()
        # Counts in the background: the accuracy bars and the gap stay readable on top.
        ax.set_zorder(hist_ax.get_zorder() + 1)
        ax.patch.set_visible(False)

    ax.bar(
        centres,
        accuracy,
        width=width,
        color="#4c72b0",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy",
    )
    gaps = [c - a for a, c in zip(accuracy, mean_conf)]
    ax.bar(
        centres,
        gaps,
        bottom=accuracy,
        width=width,
        color="#dd8452",
        alpha=0.45,
        edgecolor="#c44e52",
        hatch="//",
        linewidth=0.6,
        label="gap to mean confidence",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.plot([], [], " ", label=f"ECE = {100 * ece:.2f}% ({n_bins} bins, N = {n})")
    ax.legend(loc="upper left", fontsize="small")
    if title is not None:
        ax.set_title(title)

    all_centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    if own_figure:
        hist_ax.bar(all_centres, count.tolist(), width=width, color="grey", edgecolor="black")
        hist_ax.axvline(
            float(confidence.mean()), color="#c44e52", linestyle="--", label="mean conf."
        )
        hist_ax.axvline(float(correct.double().mean()), color="#4c72b0", label="accuracy")
        hist_ax.set_ylabel("samples")
        hist_ax.set_xlabel("confidence (max probability)")
        hist_ax.legend(loc="upper left", fontsize="small")
    else:  # twin axis of a user's axes: light bars in the bottom quarter
        hist_ax.bar(all_centres, count.tolist(), width=width, color="grey", alpha=0.3)
        hist_ax.set_ylim(0.0, 4.0 * max(int(count.max()), 1))
        hist_ax.set_ylabel("samples per bin")
        ax.set_xlabel("confidence (max probability)")
    return fig
