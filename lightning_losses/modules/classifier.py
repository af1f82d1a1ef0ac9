"""A classifier trained with a base loss (CE, GCE or truncated Lq) plus the OPL."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
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
from lightning_losses.losses.robust import generalized_cross_entropy, truncated_lq_loss
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.modules.schedulers import optimizer_config
from lightning_losses.nets import feature_dim_of

BaseLoss = Literal["ce", "gce", "truncated"]
BASE_LOSSES: tuple[str, ...] = get_args(BaseLoss)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class OPLClassifier(L.LightningModule):
    """``backbone`` -> penultimate features -> linear head, trained with a base loss + lambda * OPL.

    .. math::

        \\mathcal{L} = \\ell_{base}(W f + b, y) + \\lambda\\,\\big((1 - s) + \\gamma\\, d\\big)

    where OPL is computed on the backbone's (B, D) features ``f`` (see
    :func:`lightning_losses.losses.orthogonal_projection_loss`) and the base loss is

    - ``"ce"``: cross-entropy (with ``label_smoothing``);
    - ``"gce"``: generalized cross-entropy :math:`(1 - p_y^q)/q`
      (:func:`~lightning_losses.losses.generalized_cross_entropy`);
    - ``"truncated"``: the truncated Lq loss :math:`w_i((1 - p_y^q)/q - (1 - k^q)/q)`
      (:func:`~lightning_losses.losses.truncated_lq_loss`) with per-sample weights
      :math:`w_i \\in \\{0, 1\\}` over the training set. All weights are 1 until epoch
      ``prune_start_epoch``; at the start of that epoch and every ``prune_every`` epochs after,
      :meth:`update_sample_weights` sets :math:`w_i = [p_{y_i}(x_i) > k]` for EVERY training
      sample under the CURRENT model (eval mode, the training data set as the loader serves it,
      no gradient), as the TL paper prunes (its code reloads the best-TEST checkpoint first, a
      leak this module does not copy). The weights are a buffer, ``sample_weights``: saved in
      checkpoints, restored on resume, and the same on every rank (each rank scores its share of
      the samples, the results are all-gathered). The training batches must then be
      ``(x, y, index)`` with ``index`` the position in the training set: set
      ``return_indices=True`` on the data module. Validation and test use all weights 1.

    ``opl_weight=0`` is the base loss alone in the same module: OPL is then not computed in
    training (its s and d are still logged in validation and test, without gradient).

    Logged, with prefixes ``train/``, ``val/``, ``test/``: ``loss``, ``ce`` (cross-entropy, also
    when it is not the base loss), ``gce`` / ``truncated`` (the base loss, when it is one of
    those), ``opl``, ``opl_s``, ``opl_d``, ``acc`` (top-1) and ``acc_top5`` (more than 5
    classes); with ``base_loss="truncated"`` also ``train/kept`` (the fraction of w_i = 1).
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
        label_smoothing: passed to cross-entropy (``base_loss="ce"`` only).
        feature_dim: the backbone's feature size when it has no ``feature_dim`` attribute.
        optimizer: callable building the optimizer from the parameters (Adam, lr 1e-3, if unset).
        lr_scheduler: optional callable building the LR scheduler from the optimizer.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        eps: OPL's pair-count epsilon, finite and > 0.
        base_loss: ``"ce"``, ``"gce"`` or ``"truncated"``.
        q: the Lq exponent of ``"gce"`` / ``"truncated"``, in (0, 1] (0.7 in the papers).
        k: the truncation threshold of ``"truncated"``, in (0, 1) (0.5 in the papers).
        prune_start_epoch: first (0-based) epoch at whose start the weights are recomputed
            (40 in the authors' CIFAR-10 recipe, 80 for CIFAR-100).
        prune_every: recompute the weights every this many epochs from then (10 in the paper).
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
        base_loss: BaseLoss = "ce",
        q: float = 0.7,
        k: float = 0.5,
        prune_start_epoch: int = 40,
        prune_every: int = 10,
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
        check_choice(base_loss, "base_loss", BASE_LOSSES)
        check_float(q, "q", minimum=0.0, maximum=1.0, strict_minimum=True)
        check_float(k, "k", minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True)
        check_int(prune_start_epoch, "prune_start_epoch", minimum=0)
        check_int(prune_every, "prune_every", minimum=1)
        if label_smoothing > 0 and base_loss != "ce":
            raise ValueError(
                f'label_smoothing applies to base_loss="ce" only, got label_smoothing='
                f"{label_smoothing} with base_loss={base_loss!r}"
            )
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
        self.base_loss = base_loss
        self.q = q
        self.k = k
        self.prune_start_epoch = prune_start_epoch
        self.prune_every = prune_every
        if base_loss == "truncated":
            # Empty until the first pruning (= all ones); sized to the training set then. The
            # epoch of the last pruning guards against pruning twice in one epoch.
            self.register_buffer("sample_weights", torch.ones(0))
            self.register_buffer("pruned_epoch", torch.tensor(-1, dtype=torch.int64))

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

    # --------------------------------------------------------------------------------------
    # objective

    def compute_loss(
        self,
        features: Tensor,
        logits: Tensor,
        labels: Tensor,
        with_opl: bool,
        indices: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, OPLOutput | None]:
        """(total loss, base loss, OPL output or None). Override to change the objective.

        ``indices`` (B,) are the samples' positions in the training set; the truncated loss
        reads its weights there (None: all weights 1, as in validation and test).
        """
        self._check_labels(labels, logits)
        base = self.base_loss_value(logits, labels, indices)
        if not with_opl:
            return base, base, None
        opl = self.opl(features, labels)
        return base + self.opl_weight * opl.loss, base, opl

    def base_loss_value(
        self, logits: Tensor, labels: Tensor, indices: Tensor | None = None
    ) -> Tensor:
        """The base loss of a batch (CE, GCE, or truncated Lq with the weights at ``indices``)."""
        if self.base_loss == "ce":
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if self.base_loss == "gce":
            return generalized_cross_entropy(logits, labels, q=self.q).loss
        weights = self._weights_at(indices, labels.shape[0])
        return truncated_lq_loss(logits, labels, q=self.q, k=self.k, weights=weights).loss

    def _weights_at(self, indices: Tensor | None, batch: int) -> Tensor | None:
        if indices is None or self.sample_weights.numel() == 0:
            return None
        check_class_labels(indices, "sample indices", length=batch)
        n = self.sample_weights.shape[0]
        if indices.numel():
            (in_range,) = all_true(((indices >= 0) & (indices < n)).all())
            if not in_range:
                raise ValueError(
                    f"sample indices must lie in [0, {n}) (the training set the weights were "
                    f"computed on), got values in [{int(indices.min())}, {int(indices.max())}]"
                )
        return self.sample_weights[indices]

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

    # --------------------------------------------------------------------------------------
    # pruning (base_loss="truncated")

    def prune_due(self, epoch: int) -> bool:
        """Whether the weights are recomputed at the start of (0-based) ``epoch``."""
        return (
            self.base_loss == "truncated"
            and epoch >= self.prune_start_epoch
            and (epoch - self.prune_start_epoch) % self.prune_every == 0
        )

    def on_train_epoch_start(self) -> None:
        if self.base_loss != "truncated":
            return
        epoch = self.current_epoch
        if self.prune_due(epoch) and int(self.pruned_epoch) != epoch:
            self.update_sample_weights()
            self.pruned_epoch.fill_(epoch)
        kept = self.sample_weights.mean() if self.sample_weights.numel() else torch.tensor(1.0)
        self.log("train/kept", kept.to(self.device), on_step=False, on_epoch=True)

    def _training_dataset(self) -> Any:
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise RuntimeError(
                "update_sample_weights needs the trainer's training DataLoader (one loader whose "
                "items are (x, y, index)); pass a data set explicitly otherwise"
            )
        return dataset

    @torch.no_grad()
    def update_sample_weights(self, dataset: Any = None, batch_size: int | None = None) -> Tensor:
        """Recompute ``sample_weights``: :math:`w_i = [p_{y_i}(x_i) > k]` over the training set.

        The model is scored in eval mode (no BatchNorm update, no dropout) and its modes are
        restored after. Under DDP every rank scores ``DistributedSampler(shuffle=False)``'s share
        and the results are all-gathered, so every rank holds the same weights. The global RNG
        is not touched.

        Args:
            dataset: items ``(x, y, index, ...)``; default the trainer's training data set.
            batch_size: default the training loader's batch size (else 256).

        Returns:
            The new weights (also in the ``sample_weights`` buffer).
        """
        if self.base_loss != "truncated":
            raise RuntimeError('sample weights exist only with base_loss="truncated"')
        if dataset is None:
            dataset = self._training_dataset()
            if batch_size is None:
                batch_size = getattr(self.trainer.train_dataloader, "batch_size", None)
        n = len(dataset)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            rank = self.trainer.global_rank
            sampler: Any = DistributedSampler(dataset, world, rank, shuffle=False)
        else:
            sampler = SequentialSampler(dataset)
        loader = DataLoader(
            dataset, batch_size=batch_size or 256, sampler=sampler, generator=torch.Generator()
        )
        modes = {module: module.training for module in self.modules()}
        self.eval()
        indices, keep = [], []
        try:
            context = (
                self.trainer.precision_plugin.forward_context()
                if self._trainer is not None
                else torch.autocast(self.device.type, enabled=False)
            )
            for batch in loader:
                if not isinstance(batch, list | tuple) or len(batch) < 3:
                    raise ValueError(
                        'base_loss="truncated" needs training items (x, y, index): set '
                        "return_indices=True on the data module"
                    )
                x, y, index = (t.to(self.device) for t in batch[:3])
                with context:
                    logits = self(x)
                p = F.softmax(logits.float(), dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)
                indices.append(index.long())
                keep.append((p > self.k).float())
        finally:
            for module, mode in modes.items():
                module.train(mode)
        index = torch.cat(indices)
        kept = torch.cat(keep)
        if world > 1:
            index = self.all_gather(index).reshape(-1)
            kept = self.all_gather(kept).reshape(-1)
        weights = torch.zeros(n, device=self.device)
        seen = torch.zeros(n, device=self.device)
        # amax: DistributedSampler repeats a few samples to even out the ranks; any order of
        # the duplicates gives the same result, on every rank.
        weights.scatter_reduce_(0, index, kept, reduce="amax")
        seen.scatter_reduce_(0, index, torch.ones_like(kept), reduce="amax")
        if not bool(seen.all()):
            raise ValueError(
                f"the sample indices must cover 0..{n - 1} (positions in the training set), "
                f"{int((seen == 0).sum())} positions were never seen"
            )
        if self.sample_weights.shape != weights.shape:
            self.sample_weights.resize_(weights.shape)  # in place: DDP keeps its reference
        self.sample_weights.copy_(weights)
        return self.sample_weights

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The weights are sized to the training set at the first pruning: size the empty
        # buffer to the checkpoint's before loading, so resuming and load_from_checkpoint work.
        key = prefix + "sample_weights"
        if self.base_loss == "truncated" and key in state_dict:
            shape = state_dict[key].shape
            if self.sample_weights.shape != shape:
                self.sample_weights.resize_(shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --------------------------------------------------------------------------------------
    # steps

    def _step(self, batch: Any, stage: str, metrics: MetricCollection) -> dict[str, Tensor]:
        x, y, *rest = batch
        indices = rest[0] if rest else None
        if stage == "train" and self.base_loss == "truncated" and indices is None:
            raise ValueError(
                'base_loss="truncated" needs training batches (x, y, index) to read its '
                "per-sample weights: set return_indices=True on the data module"
            )
        features = self.features(x)
        logits = self.head(features)
        extra = {"indices": indices} if stage == "train" and indices is not None else {}
        if stage == "train":
            loss, base, opl = self.compute_loss(
                features, logits, y, with_opl=self.opl_weight > 0, **extra
            )
        else:
            with torch.no_grad():
                loss, base, opl = self.compute_loss(features, logits, y, with_opl=True)
        batch_size = y.shape[0]
        values = {"loss": loss}
        if self.base_loss == "ce":
            values["ce"] = base
        else:
            values[self.base_loss] = base
            with torch.no_grad():
                values["ce"] = F.cross_entropy(logits, y)
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
        return optimizer_config(optimizer, self.lr_scheduler, self.scheduler_interval)
