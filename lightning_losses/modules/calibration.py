"""Post-hoc calibration of a frozen classifier: temperature scaling, CE or CA calibrators."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_losses.checks import check_choice, check_int, check_not_probabilities
from lightning_losses.losses.calibration import (
    CA_WEIGHTINGS,
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
)
from lightning_losses.losses.opl import all_gather_rows
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.nets.calibrators import (
    PostHocCalibrator,
    TemperatureCalibrator,
    TemperatureScaling,
)

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
    try:
        return OPLClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as error:
        raise ValueError(
            f"classifier_checkpoint {path} is not a readable OPLClassifier checkpoint: {error}"
        ) from error


def _load_state(path: str | Path) -> dict:
    """The state dict in a checkpoint (``state_dict`` entry) or a plain state-dict file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"classifier_checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"classifier_checkpoint {path} is not a readable checkpoint: {error}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"classifier_checkpoint {path} must hold a state dict, got {type(state).__name__}"
        )
    return state.get("state_dict", state)


class PostHocCalibration(L.LightningModule):
    """Fits a calibrator on a frozen classifier's logits; tests before and after calibration.

    The classifier (any nn.Module returning logits) is frozen: eval mode, no gradient. With a
    :class:`~lightning_losses.datamodules.CalibrationDataModule`, the logits of the calibration
    split (and of its transformed views, when the calibrator uses them) are computed once and
    cached; training then only runs the calibrator. Objectives (``loss``):

    - ``"ca"``: the correctness-aware loss (Liu et al. 2024),
    - ``"ce"``: cross-entropy / NLL of the calibrated logits (the usual objective),
    - ``"mse"``: the Brier score of the calibrated probabilities.

    The calibrator's inputs that depend on the cached logits alone (the CA calibrator's
    :meth:`~lightning_losses.nets.CorrectnessAwareCalibrator.features`) are computed once when
    the outputs are cached, so a training step never touches the views' (V, B, C) logits.
    Calibrators that are not trained by gradient (histogram binning, isotonic regression, ...:
    every :class:`~lightning_losses.nets.calibrators.PostHocCalibrator` that is not a
    :class:`~lightning_losses.nets.calibrators.TemperatureCalibrator`) are fitted in closed form
    by their ``fit`` on the cached calibration split at the start of ``fit``.

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
        weighting: the CA loss's weighting (``"balanced"``: the authors' per-batch weights;
            ``"split"``: the weights from the whole calibration split's accuracy; ``"none"``).
        allow_probabilities: fit even when the classifier's outputs are all probability rows
            (refused by default: a calibrator is fitted on logits).
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
        weighting: Literal["balanced", "split", "none"] = "balanced",
        allow_probabilities: bool = False,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        check_choice(weighting, "weighting", CA_WEIGHTINGS)
        check_int(num_classes, "num_classes", minimum=2)
        if weighting != "balanced" and loss != "ca":
            raise ValueError(f"weighting applies to loss='ca' only, got loss={loss!r}")
        if not isinstance(calibrator, PostHocCalibrator):
            raise ValueError(
                "calibrator must be a PostHocCalibrator (TemperatureScaling, "
                f"CorrectnessAwareCalibrator, ...), got {type(calibrator).__name__}"
            )
        if classifier is None and classifier_checkpoint is None:
            raise ValueError("give classifier (an nn.Module), classifier_checkpoint, or both")
        save_config_hyperparameters(self, ["calibrator", "classifier", "optimizer"])
        if classifier is None:
            classifier = load_classifier(classifier_checkpoint)
        elif classifier_checkpoint is not None:
            classifier.load_state_dict(_load_state(classifier_checkpoint))
        self.classifier = classifier.eval().requires_grad_(False)
        self.calibrator = calibrator
        self.num_classes = num_classes
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.optimizer = optimizer
        self.lbfgs_max_iter = lbfgs_max_iter
        self.test_after_fit = test_after_fit
        self.weighting = weighting
        self.allow_probabilities = allow_probabilities
        self.split_accuracy: float | None = None
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

    def outputs_key(self) -> str:
        """A fingerprint of what :meth:`classifier_logits` computes: the classifier's class and
        every tensor of its state (names, dtypes, shapes, bytes; sha256), whether the views'
        logits are computed, and the device type; the data module's ``output_cache`` keys the
        outputs by it (with its own settings)."""
        digest = hashlib.sha256()
        kind = type(self.classifier)
        views = bool(getattr(self.calibrator, "requires_views", False))
        digest.update(f"{kind.__module__}.{kind.__qualname__}|{views}|{self.device.type}".encode())
        for name, tensor in self.classifier.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

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
            # A key only with a disk cache (hashing the weights costs a pass over them).
            keyed = getattr(datamodule, "output_cache", None) is not None
            extra = {"key": self.outputs_key()} if keyed else {}
            datamodule.cache_outputs(self.classifier_logits, device=self.device, **extra)
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
            if cached is not None:
                self._prepare_cached(datamodule.cached, cached)
        if (
            stage == "test"
            and getattr(datamodule, "output_cache", None) is not None
            and hasattr(datamodule, "cache_test_outputs")
        ):
            # The test sets' outputs once, from the folder when another calibrator of the same
            # classifier and data settings computed them (identical batches: same metrics).
            self.classifier.to(self.device)
            datamodule.cache_test_outputs(
                self.classifier_logits, device=self.device, key=self.outputs_key()
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

    def _prepare_cached(self, splits: dict[str, Any], train: Any) -> None:
        """Once per fit, on the cached outputs: refuse probability rows, fit a closed-form
        calibrator, compute the calibrator's own inputs (the CA features) once."""
        check_not_probabilities(
            train.logits, "the classifier's outputs (cached logits)", self.allow_probabilities
        )
        if self.weighting == "split":
            correct = train.logits.argmax(dim=1) == train.labels
            self.split_accuracy = float(correct.double().mean())
        if not isinstance(self.calibrator, TemperatureCalibrator):
            view_logits = train.view_logits
            if view_logits is not None:
                view_logits = view_logits.transpose(0, 1)
            # On the CPU, where the cache lives (and the calibrator still is during setup).
            self.calibrator.fit(
                train.logits,
                train.labels,
                view_logits,
                allow_probabilities=self.allow_probabilities,
            )
            return
        if not hasattr(self.calibrator, "features"):
            return
        for cached in {id(v): v for v in splits.values()}.values():
            if cached.view_logits is None:
                continue
            # cached.view_logits are (N, V, C); the calibrator takes (V, N, C).
            features = self.calibrator.features(cached.logits, cached.view_logits.transpose(0, 1))
            cached.set_features(features)

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """(logits, view_logits or None, features or None, labels) from a cached or an image
        batch."""
        if isinstance(batch, dict):  # cached by the data module
            return (
                batch["logits"],
                batch.get("view_logits"),
                batch.get("features"),
                batch["labels"],
            )
        if len(batch) == 3:
            images, views, labels = batch
        else:
            (images, labels), views = batch, None
        logits, view_logits = self.classifier_logits(images, views)
        return logits, view_logits, None, labels

    def _objective(self, calibrated: Tensor, labels: Tensor) -> Any:
        if self.loss_name == "ca":
            accuracy = self.split_accuracy if self.weighting == "split" else None
            return correctness_aware_loss(calibrated, labels, self.weighting, accuracy)
        return self.loss_fn(calibrated, labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if not isinstance(self.calibrator, TemperatureCalibrator):
            return None  # fitted in closed form at setup
        optimizer = self.optimizers()
        logits, view_logits, features, labels = self._unpack(batch)
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
            out = self._objective(self.calibrator(logits, view_logits, features), labels)
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
        logits, view_logits, features, labels = self._unpack(batch)
        out = self._objective(self.calibrator(logits, view_logits, features), labels)
        for key, value in out._asdict().items():
            self.log(f"val/{key}", value, batch_size=labels.shape[0], sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.test_set_names[dataloader_idx]
        logits, view_logits, _, labels = self._unpack(batch)
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

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        if not isinstance(self.calibrator, TemperatureCalibrator):
            return None  # fitted in closed form at setup
        params = list(self.calibrator.parameters())
        if isinstance(self.calibrator, TemperatureScaling):
            return torch.optim.LBFGS(
                params, lr=1.0, max_iter=self.lbfgs_max_iter, line_search_fn="strong_wolfe"
            )
        return self.optimizer(params)
