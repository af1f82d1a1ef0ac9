"""A classifier trained with cross-entropy plus the Orthogonal Projection Loss."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_losses.checks import (
    all_true,
    check_choice,
    check_class_labels,
    check_float,
    check_int,
)
from lightning_losses.losses.opl import AbsMode, OPLOutput, OrthogonalProjectionLoss
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.nets import feature_dim_of


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class OPLClassifier(L.LightningModule):
    """``backbone`` -> penultimate features -> linear head, trained with CE + lambda * OPL.

    .. math::

        \\mathcal{L} = \\mathrm{CE}(W f + b, y) + \\lambda\\,\\big((1 - s) + \\gamma\\, d\\big)

    where OPL is computed on the backbone's (B, D) features ``f`` (see
    :func:`lightning_losses.losses.orthogonal_projection_loss`). ``opl_weight=0`` is the plain
    cross-entropy baseline in the same module: OPL is then not computed in training (its s and d
    are still logged in validation and test, without gradient).

    Logged, with prefixes ``train/``, ``val/``, ``test/``: ``loss``, ``ce``, ``opl``, ``opl_s``,
    ``opl_d``, ``acc`` (top-1) and ``acc_top5`` (when there are more than 5 classes).
    ``validation_step`` and ``test_step`` return the features, logits and labels, for callbacks
    such as :class:`~lightning_losses.callbacks.FeatureGeometryCallback` and
    :class:`~lightning_losses.callbacks.CalibrationCallback`.

    Args:
        backbone: any nn.Module returning (B, D) features; D is read from its ``feature_dim``
            attribute unless ``feature_dim`` is given.
        num_classes: number of classes (linked from the data module by the CLI).
        opl_weight: lambda, >= 0.
        gamma: weight of OPL's negative-pair term.
        abs_mode: OPL variant, ``"none"``, ``"mean"`` or ``"pair"``.
        gather_distributed: compute OPL on the batch gathered from every rank.
        label_smoothing: passed to cross-entropy.
        feature_dim: the backbone's feature size when it has no ``feature_dim`` attribute.
        optimizer: callable building the optimizer from the parameters (Adam, lr 1e-3, if unset).
        lr_scheduler: optional callable building the LR scheduler from the optimizer.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        eps: OPL's pair-count epsilon, finite and > 0.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        opl_weight: float = 1.0,
        gamma: float = 0.5,
        abs_mode: AbsMode = "none",
        gather_distributed: bool = False,
        label_smoothing: float = 0.0,
        feature_dim: int | None = None,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=2)
        check_float(opl_weight, "opl_weight", minimum=0.0)
        check_float(
            label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0, strict_maximum=True
        )
        check_choice(scheduler_interval, "scheduler_interval", ("epoch", "step"))
        check_float(gamma, "gamma", minimum=0.0)
        check_float(eps, "eps", minimum=0.0, strict_minimum=True)
        save_config_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.feature_dim = feature_dim if feature_dim is not None else feature_dim_of(backbone)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes
        self.opl_weight = opl_weight
        self.label_smoothing = label_smoothing
        self.opl = OrthogonalProjectionLoss(gamma, abs_mode, gather_distributed, eps)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval

        metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def features(self, x: Tensor) -> Tensor:
        """The backbone's (B, D) penultimate features."""
        features = self.backbone(x)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"the backbone must return (B, {self.feature_dim}) features, got "
                f"{tuple(features.shape)}; set feature_dim or fix the backbone's output"
            )
        return features

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(x))

    def compute_loss(
        self, features: Tensor, logits: Tensor, labels: Tensor, with_opl: bool
    ) -> tuple[Tensor, Tensor, OPLOutput | None]:
        """(total loss, cross-entropy, OPL output or None). Override to change the objective."""
        self._check_labels(labels, logits)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if not with_opl:
            return ce, ce, None
        opl = self.opl(features, labels)
        return ce + self.opl_weight * opl.loss, ce, opl

    def _check_labels(self, labels: Tensor, logits: Tensor) -> None:
        # Dtype / shape first (free), then the range in ONE host read, so a bad label is a clear
        # ValueError instead of cross-entropy's device-side assert or IndexError.
        check_class_labels(labels, "labels", length=logits.shape[0])
        if labels.numel() == 0:
            return
        (in_range,) = all_true(((labels >= 0) & (labels < self.num_classes)).all())
        if not in_range:
            raise ValueError(
                f"labels must be class indices in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    def _step(self, batch: Any, stage: str, metrics: MetricCollection) -> dict[str, Tensor]:
        x, y = batch
        features = self.features(x)
        logits = self.head(features)
        if stage == "train":
            loss, ce, opl = self.compute_loss(features, logits, y, with_opl=self.opl_weight > 0)
        else:
            with torch.no_grad():
                loss, ce, opl = self.compute_loss(features, logits, y, with_opl=True)
        batch_size = y.shape[0]
        values = {"loss": loss, "ce": ce}
        if opl is not None:
            values.update(opl=opl.loss, opl_s=opl.pos_mean, opl_d=opl.neg_mean)
        self.log_dict(
            {f"{stage}/{k}": v.detach() for k, v in values.items()},
            on_step=stage == "train",
            on_epoch=True,
            batch_size=batch_size,
            sync_dist=stage != "train",  # a per-step all-reduce in training costs every step
        )
        metrics.update(logits.detach(), y)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return {"loss": loss, "features": features.detach(), "logits": logits.detach(), "labels": y}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
