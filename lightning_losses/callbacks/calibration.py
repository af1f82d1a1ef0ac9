"""Calibration metrics and reliability diagrams for any classification LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_losses.callbacks._hooks import SplitHooks, output_dir
from lightning_losses.losses.opl import all_gather_rows


class CalibrationCallback(SplitHooks):
    """Logs ``<stage>/ece``, ``ece25``, ``adaptive_ece``, ``classwise_ece``, ``nll``, ``brier``,
    ``auroc`` on validation and test, and saves reliability diagrams as PNG.

    Works with any classification module: it reads ``"logits"`` and ``"labels"`` from the dict
    that ``validation_step`` / ``test_step`` return (as
    :class:`~lightning_losses.modules.OPLClassifier` does) and otherwise runs
    ``pl_module(x)`` on an ``(x, y)`` batch. Metrics are torchmetrics objects whose states are
    synced across ranks (never an average of per-batch values).

    Args:
        diagrams: save a reliability diagram after each validation epoch and each test run
            (this keeps the stage's probabilities in memory until the epoch ends).
        n_bins: bins of the diagram.
        dirpath: where the PNGs go; defaults to ``<trainer.log_dir>/reliability``.
    """

    def __init__(self, diagrams: bool = True, n_bins: int = 15, dirpath: str | None = None):
        self.diagrams = diagrams
        self.n_bins = n_bins
        self.dirpath = dirpath
        self.metrics: dict[str, Any] = {}
        self._probs: list[Tensor] = []
        self._labels: list[Tensor] = []
        self.saved: list[Path] = []

    def _metrics(self, stage: str, pl_module: L.LightningModule) -> Any:
        if stage not in self.metrics:
            from lightning_losses.metrics import calibration_collection

            num_classes = getattr(pl_module, "num_classes", None)
            if num_classes is None:
                raise ValueError(
                    "CalibrationCallback needs the module's num_classes attribute (an int)"
                )
            self.metrics[stage] = calibration_collection(num_classes)
        return self.metrics[stage].to(pl_module.device)

    def _reset(self) -> None:
        self._probs, self._labels = [], []

    def _collect(self, stage: str, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        if isinstance(outputs, dict) and "logits" in outputs and "labels" in outputs:
            logits, labels = outputs["logits"], outputs["labels"]
        else:
            x, labels = batch[0], batch[1]
            with torch.no_grad():
                logits = pl_module(x)
        probs = logits.detach().float().softmax(dim=1)
        self._metrics(stage, pl_module).update(probs, labels)
        if self.diagrams:
            self._probs.append(probs)
            self._labels.append(labels.detach())

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if stage not in self.metrics:
            return
        collection = self.metrics[stage]
        for name, value in collection.compute().items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)
        collection.reset()
        if self.diagrams and self._probs:
            probs = all_gather_rows(torch.cat(self._probs))
            labels = all_gather_rows(torch.cat(self._labels))
            if trainer.is_global_zero:
                self._save_diagram(trainer, stage, probs, labels)
        self._reset()

    def _save_diagram(self, trainer: L.Trainer, stage: str, probs: Tensor, labels: Tensor) -> None:
        from lightning_losses.metrics import reliability_diagram

        name = f"{stage}_epoch{trainer.current_epoch:03d}.png"
        path = output_dir(trainer, self.dirpath, "reliability") / name
        title = f"{stage}, epoch {trainer.current_epoch}"
        figure = reliability_diagram(probs.cpu(), labels.cpu(), self.n_bins, title=title)
        figure.savefig(path, dpi=110)
        self.saved.append(path)
