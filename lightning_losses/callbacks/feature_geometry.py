"""Intra- and inter-class cosine similarity of a classifier's features over a whole split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.callbacks._hooks import SplitHooks, output_dir
from lightning_losses.losses.opl import all_gather_rows, pair_sums


def cosine_geometry(features: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean cosine over same-class pairs (i != j), over different-class pairs, and their gap.

    The same quantities as OPL's s and d, on a whole set, in float64 and O(N D).
    Returns ``{"intra_cos", "inter_cos", "cos_gap"}``; a mean with no pair is NaN.
    """
    f = F.normalize(features.detach().to(torch.float64), dim=1)
    pos_sum, neg_sum, pos_count, neg_count = pair_sums(f, labels)
    intra = (pos_sum / pos_count).item() if pos_count > 0 else float("nan")
    inter = (neg_sum / neg_count).item() if neg_count > 0 else float("nan")
    return {"intra_cos": intra, "inter_cos": inter, "cos_gap": intra - inter}


class FeatureGeometryCallback(SplitHooks):
    """Logs ``<stage>/intra_cos``, ``<stage>/inter_cos`` and ``<stage>/cos_gap`` for val and test.

    Reads the ``"features"`` and ``"labels"`` that the module's ``validation_step`` /
    ``test_step`` return (as :class:`~lightning_losses.modules.OPLClassifier` does), gathers them
    from every rank, and computes :func:`cosine_geometry` over the whole split. OPL pushes the
    gap towards 1 (same class parallel, different classes orthogonal).

    Args:
        plot_every_n_epochs: also save a PNG of a 2-D PCA projection of the normalised features
            every n validation epochs (and after testing); 0 disables plots.
        max_points: at most this many points in a plot.
        dirpath: where the PNGs go; defaults to ``<trainer.log_dir>/feature_geometry``.
    """

    def __init__(
        self, plot_every_n_epochs: int = 0, max_points: int = 2000, dirpath: str | None = None
    ) -> None:
        if plot_every_n_epochs < 0:
            raise ValueError(f"plot_every_n_epochs must be >= 0, got {plot_every_n_epochs}")
        self.plot_every_n_epochs = plot_every_n_epochs
        self.max_points = max_points
        self.dirpath = dirpath
        self._features: list[Tensor] = []
        self._labels: list[Tensor] = []
        self.last: dict[str, dict[str, float]] = {}

    def _reset(self) -> None:
        self._features, self._labels = [], []

    def _collect(self, stage: str, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        if isinstance(outputs, dict) and "features" in outputs and "labels" in outputs:
            self._features.append(outputs["features"].detach())
            self._labels.append(outputs["labels"].detach())

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._features:
            return
        features = all_gather_rows(torch.cat(self._features))
        labels = all_gather_rows(torch.cat(self._labels))
        self._reset()
        geometry = cosine_geometry(features, labels)
        self.last[stage] = geometry
        for name, value in geometry.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)
        epoch = trainer.current_epoch
        wants_plot = self.plot_every_n_epochs > 0 and (
            stage == "test" or (epoch + 1) % self.plot_every_n_epochs == 0
        )
        if wants_plot and trainer.is_global_zero:
            root = output_dir(trainer, self.dirpath, "feature_geometry")
            self.plot(features, labels, root / f"{stage}_epoch{epoch:03d}.png")

    def plot(self, features: Tensor, labels: Tensor, path: Path) -> Path:
        """Scatter the first two principal components of the normalised features."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        f = F.normalize(features.detach().float().cpu(), dim=1)[: self.max_points]
        y = labels.detach().cpu()[: self.max_points]
        centred = f - f.mean(dim=0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(xy[:, 0], xy[:, 1], c=y.numpy(), cmap="tab10", s=6)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title("normalised features, 2-D PCA")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
