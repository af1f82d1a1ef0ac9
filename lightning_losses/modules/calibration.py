"""Post-hoc calibration of a frozen classifier: temperature scaling, CE or CA calibrators."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_losses.losses.calibration import (
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
)
from lightning_losses.losses.opl import all_gather_rows
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.nets.calibrators import TemperatureCalibrator, TemperatureScaling

LOSSES = {"ca": correctness_aware_loss, "ce": calibration_cross_entropy, "mse": calibration_mse}
DIGITS_CE_COMMAND = "lightning-losses fit --config configs/opl/digits_ce.yaml"


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def calibration_metrics(num_classes: int) -> MetricCollection:
    """Accuracy and every calibration metric, on probabilities, synced across ranks."""
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_losses.metrics import calibration_collection

    collection = calibration_collection(num_classes)
    collection.add_metrics({"acc": MulticlassAccuracy(num_classes, average="micro")})
    return collection


def load_classifier(path: str | Path) -> nn.Module:
    """An ``OPLClassifier`` from a checkpoint the CLI wrote (weights-only load; eval mode)."""
    from lightning_losses.modules.classifier import OPLClassifier

    path = Path(path)
    if not path.exists():
        hint = f" Train it first: {DIGITS_CE_COMMAND}" if "digits_ce" in str(path) else ""
        raise FileNotFoundError(f"classifier_checkpoint {path} does not exist.{hint}")
    return OPLClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class PostHocCalibration(L.LightningModule):
    """Fits a calibrator on a frozen classifier's logits; tests before and after calibration.

    The classifier (any nn.Module returning logits) is frozen: eval mode, no gradient. With a
    :class:`~lightning_losses.datamodules.CalibrationDataModule`, the logits of the calibration
    split (and of its transformed views, when the calibrator uses them) are computed once and
    cached; training then only runs the calibrator. Objectives (``loss``):

    - ``"ca"``: the correctness-aware loss (Liu et al. 2024),
    - ``"ce"``: cross-entropy / NLL of the calibrated logits (the usual objective),
    - ``"mse"``: the Brier score of the calibrated probabilities.

    :class:`~lightning_losses.nets.TemperatureScaling` is fitted with LBFGS and a strong-Wolfe
    line search (full batch: give the data module a batch size of at least the calibration
    split; under DDP it fits on the batches gathered from every rank, so each rank takes the same
    LBFGS steps); other calibrators with ``optimizer`` (Adam, lr 1e-3, by default) on
    mini-batches.

    In test, every test set of the data module (``test_set_names``: ``id``, the shifts, the OOD
    sets) logs ``test/<set>/<metric>`` for the calibrated and ``test/<set>/uncal_<metric>`` for
    the uncalibrated probabilities: acc, ece (15 bins), ece25, adaptive_ece (15 equal-mass
    bins), classwise_ece, nll, brier, auroc (of confidence for correct vs wrong).

    Args:
        calibrator: a :class:`~lightning_losses.nets.calibrators.TemperatureCalibrator`.
        num_classes: number of classes (linked from the data module by the CLI).
        classifier: the frozen classifier; None to load ``classifier_checkpoint``.
        classifier_checkpoint: an ``OPLClassifier`` checkpoint to load; with ``classifier``
            given as well, only its ``state_dict`` is loaded into it.
        loss: ``"ca"``, ``"ce"`` or ``"mse"``.
        optimizer: builds the optimizer of a non-TS calibrator.
        lbfgs_max_iter: LBFGS iterations per step for temperature scaling.
        test_after_fit: ``lightning-losses fit`` runs the test sets right after fitting.
    """

    def __init__(
        self,
        calibrator: nn.Module,
        num_classes: int,
        classifier: nn.Module | None = None,
        classifier_checkpoint: str | None = None,
        loss: Literal["ca", "ce", "mse"] = "ca",
        optimizer: OptimizerCallable = _adam,
        lbfgs_max_iter: int = 100,
        test_after_fit: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        if not isinstance(calibrator, TemperatureCalibrator):
            raise ValueError(
                "calibrator must be a TemperatureCalibrator (TemperatureScaling or "
                f"CorrectnessAwareCalibrator), got {type(calibrator).__name__}"
            )
        if classifier is None and classifier_checkpoint is None:
            raise ValueError("give classifier (an nn.Module), classifier_checkpoint, or both")
        save_config_hyperparameters(self, ["calibrator", "classifier", "optimizer"])
        if classifier is None:
            classifier = load_classifier(classifier_checkpoint)
        elif classifier_checkpoint is not None:
            state = torch.load(classifier_checkpoint, map_location="cpu", weights_only=True)
            classifier.load_state_dict(state.get("state_dict", state))
        self.classifier = classifier.eval().requires_grad_(False)
        self.calibrator = calibrator
        self.num_classes = num_classes
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.optimizer = optimizer
        self.lbfgs_max_iter = lbfgs_max_iter
        self.test_after_fit = test_after_fit
        self.automatic_optimization = False
        self.test_set_names: list[str] = []
        self.test_class_subsets: list[list[int] | None] = []
        self.test_metrics = nn.ModuleDict()

    # ---- the frozen classifier -----------------------------------------------------------

    def train(self, mode: bool = True) -> PostHocCalibration:
        """Only the calibrator trains: the classifier stays in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        self.classifier.eval()
        return self

    @torch.no_grad()
    def classifier_logits(self, images: Tensor, views: Tensor | None = None) -> tuple[Tensor, ...]:
        """Logits (N, C) of the images and, when views (N, V, ...) are given, (V, N, C) of them."""
        logits = self.classifier(images).float()
        if views is None or not self.calibrator.requires_views:
            return logits, None
        n, v = views.shape[:2]
        view_logits = self.classifier(views.flatten(0, 1)).float()
        return logits, view_logits.view(n, v, -1).transpose(0, 1)

    def forward(self, logits: Tensor, view_logits: Tensor | None = None) -> Tensor:
        """Calibrated logits from the classifier's logits (and the views' logits)."""
        return self.calibrator(logits, view_logits)

    # ---- fitting -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and hasattr(datamodule, "cache_outputs"):
            # In setup, self.device is already the accelerator's device but Lightning moves the
            # module there only afterwards: move the classifier first, or the batches sent to
            # self.device would meet weights still on the CPU.
            self.classifier.to(self.device)
            datamodule.cache_outputs(self.classifier_logits, device=self.device)
            cached = (getattr(datamodule, "cached", None) or {}).get("train")
            if cached is not None and len(cached) == 0:
                raise ValueError(
                    "the calibration split must hold at least one sample, got 0: nothing to fit"
                )
            if cached is not None and cached.logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"num_classes must match the classifier's outputs: num_classes="
                    f"{self.num_classes}, but the classifier gives {cached.logits.shape[1]} "
                    "logits per sample"
                )
        if stage == "test" and datamodule is not None and hasattr(datamodule, "test_set_names"):
            self.test_set_names = list(datamodule.test_set_names)
        if stage == "test" and not self.test_set_names:
            self.test_set_names = ["id"]
        if stage == "test":
            subsets = getattr(datamodule, "test_class_subsets", None)
            self.test_class_subsets = (
                list(subsets) if subsets else [None] * len(self.test_set_names)
            )
        if stage == "test":
            self.test_metrics = nn.ModuleDict(
                {
                    f"{name}/{kind}": calibration_metrics(self.num_classes).to(self.device)
                    for name in self.test_set_names
                    for kind in ("cal", "uncal")
                }
            )

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        """(logits, view_logits or None, labels) from a cached or an image batch."""
        if isinstance(batch, dict):  # cached by the data module
            return batch["logits"], batch.get("view_logits"), batch["labels"]
        if len(batch) == 3:
            images, views, labels = batch
        else:
            (images, labels), views = batch, None
        logits, view_logits = self.classifier_logits(images, views)
        return logits, view_logits, labels

    def _loss(self, batch: Any) -> Tensor:
        logits, view_logits, labels = self._unpack(batch)
        return self.loss_fn(self.calibrator(logits, view_logits), labels).loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        logits, view_logits, labels = self._unpack(batch)
        # LBFGS runs the closure a data-dependent number of times and, under DDP, every
        # manual_backward all-reduces the gradients: ranks that saw different losses would run
        # different numbers of backward passes and deadlock. Temperature scaling therefore fits
        # its one parameter on the batch gathered from every rank, with the same loss everywhere.
        same_loss_everywhere = (
            isinstance(self.calibrator, TemperatureScaling) and self.trainer.world_size > 1
        )
        if same_loss_everywhere:
            logits, labels = all_gather_rows(logits.detach()), all_gather_rows(labels)

        parts: dict[str, Tensor] = {}

        def closure() -> Tensor:
            optimizer.zero_grad()
            out = self.loss_fn(self.calibrator(logits, view_logits), labels)
            parts.update(accuracy=out.accuracy, confidence=out.confidence)
            loss = out.loss
            self.manual_backward(loss)
            if same_loss_everywhere:  # bitwise equal on every rank (the gradients already are)
                loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
            return loss

        loss = optimizer.step(closure=closure)
        self.log("train/loss", loss.detach(), batch_size=labels.shape[0], on_epoch=True)
        for key, value in parts.items():  # the calibrated batch's accuracy and mean confidence
            self.log(f"train/{key}", value, batch_size=labels.shape[0], on_epoch=True)
        if isinstance(self.calibrator, TemperatureScaling):
            self.log("train/temperature", self.calibrator.scalar_temperature().detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, view_logits, labels = self._unpack(batch)
        out = self.loss_fn(self.calibrator(logits, view_logits), labels)
        for key, value in out._asdict().items():
            self.log(f"val/{key}", value, batch_size=labels.shape[0], sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.test_set_names[dataloader_idx]
        logits, view_logits, labels = self._unpack(batch)
        subset = self.test_class_subsets[dataloader_idx]
        if subset is not None:  # e.g. ImageNet-A / -R: only their 200 classes compete
            from lightning_losses.datamodules.shifts import restrict_logits

            logits = restrict_logits(logits, subset)
            if view_logits is not None:
                view_logits = restrict_logits(view_logits.flatten(0, 1), subset).view_as(
                    view_logits
                )
        calibrated = self.calibrator(logits, view_logits)
        for kind, values in (("uncal", logits), ("cal", calibrated)):
            metrics = self.test_metrics[f"{name}/{kind}"]
            metrics.update(values.float().softmax(dim=1), labels)
            prefix = f"test/{name}/" + ("uncal_" if kind == "uncal" else "")
            self.log_dict(
                {prefix + key: metric for key, metric in metrics.items()},
                on_step=False,
                on_epoch=True,
                add_dataloader_idx=False,
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.calibrator.parameters())
        if isinstance(self.calibrator, TemperatureScaling):
            return torch.optim.LBFGS(
                params, lr=1.0, max_iter=self.lbfgs_max_iter, line_search_fn="strong_wolfe"
            )
        return self.optimizer(params)
