"""The data of a post-hoc calibration run: a calibration split, views and shifted test sets."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from lightning_losses.datamodules.base import (
    ClassificationDataModule,
    TransformedSubset,
    WrapperDataModule,
    stratified_split,
)
from lightning_losses.datamodules.sampling import EpochSeededRandomSampler
from lightning_losses.datamodules.shifts import (
    CORRUPTIONS,
    SEVERITIES,
    CorruptedDataset,
)
from lightning_losses.datamodules.views import ViewsDataset, default_view_transforms

__all__ = ["CachedOutputs", "CalibrationDataModule", "collate_cached", "dataset_targets"]

#: A frozen classifier's outputs of a batch (:meth:`CalibrationDataModule.cache_outputs`):
#: ``fn(images, views) -> (logits (B, C), view_logits (V, B, C) or None)``.
OutputsFn = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """The int label of every item of ``dataset``, cheaply when possible.

    Reads ``TensorDataset.tensors[1]``, a ``targets`` attribute, or the targets of the data set
    under a ``Subset`` / :class:`TransformedSubset`; otherwise iterates over the data set once
    (loading every item).
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return np.asarray(dataset.tensors[1].cpu(), dtype=np.int64).reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        if isinstance(targets, Tensor):
            targets = targets.cpu()
        return np.asarray(targets, dtype=np.int64).reshape(-1)
    if isinstance(dataset, Subset | TransformedSubset):
        parent = dataset_targets(dataset.dataset)
        return parent[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _normalisation_of(
    datamodule: L.LightningDataModule, num_channels: int
) -> tuple[Any, Any] | tuple[None, None]:
    """``(mean, std)`` of the wrapped module's normalisation when it exposes them as ``mean`` /
    ``std`` attributes (a float, or one float per channel), else ``(None, None)``."""

    def usable(value: Any) -> bool:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return True
        return (
            isinstance(value, Sequence)
            and len(value) in (1, num_channels)
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        )

    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if usable(mean) and usable(std):
        return mean, std
    return None, None


class CachedOutputs(Dataset):
    """Per-item classifier outputs: ``{"logits": (C,), "view_logits": (V, C), "labels": ()}``.

    Built by :meth:`CalibrationDataModule.cache_outputs`; batched by :func:`collate_cached`.
    After :meth:`set_features` (the calibrator's own inputs, computed once from the cached
    logits), items carry ``"features"`` instead of ``"view_logits"``. A whole batch is read
    with one index per tensor (``__getitems__``), not one item at a time.
    """

    def __init__(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None = None) -> None:
        if view_logits is not None and view_logits.shape[0] != logits.shape[0]:
            raise ValueError(
                f"view_logits must be (N, V, C) with N = {logits.shape[0]}, got "
                f"{tuple(view_logits.shape)}"
            )
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must have one entry per row of logits ({logits.shape[0]}), got "
                f"{labels.shape[0]}"
            )
        self.logits = logits
        self.labels = labels
        self.view_logits = view_logits
        self.features: Tensor | None = None

    def set_features(self, features: Tensor) -> None:
        """Serve ``features`` (N, F) instead of the views' logits from now on."""
        if not isinstance(features, Tensor) or features.ndim != 2 or len(features) != len(self):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(f"features must be a tensor of shape (N={len(self)}, F), got {shape}")
        self.features = features

    def __len__(self) -> int:
        return self.logits.shape[0]

    def _fields(self) -> dict[str, Tensor]:
        fields = {"logits": self.logits, "labels": self.labels}
        if self.features is not None:
            fields["features"] = self.features
        elif self.view_logits is not None:
            fields["view_logits"] = self.view_logits
        return fields

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self._fields().items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        batch = {key: value[rows] for key, value in self._fields().items()}
        batch[_BATCHED] = torch.ones(())
        return batch


_BATCHED = "_batched"  # marks a batch that __getitems__ already stacked
_NOT_KEYED = {"num_workers", "output_cache"}  # settings that do not change the outputs


def _save_outputs(path: Path, outputs: list[CachedOutputs]) -> None:
    """Write ``outputs`` to ``path`` atomically (a temporary file renamed: a reader never sees
    half a file, and two writers of the same key leave one whole copy)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for i, cached in enumerate(outputs):
        tensors[f"{i}/logits"] = cached.logits.contiguous()
        tensors[f"{i}/labels"] = cached.labels.contiguous()
        if cached.view_logits is not None:
            tensors[f"{i}/view_logits"] = cached.view_logits.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def _load_outputs(path: Path, count: int) -> list[CachedOutputs]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"output_cache file {path} is not a readable safetensors file: {error}; delete it"
        ) from error
    outputs = []
    for i in range(count):
        if f"{i}/logits" not in tensors or f"{i}/labels" not in tensors:
            raise ValueError(f"output_cache file {path} lacks the outputs of set {i}; delete it")
        outputs.append(
            CachedOutputs(
                tensors[f"{i}/logits"], tensors[f"{i}/labels"], tensors.get(f"{i}/view_logits")
            )
        )
    return outputs


def collate_cached(items: list[dict[str, Tensor]] | dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack cached items; ``view_logits`` comes out ``(V, B, C)`` like the classifier's."""
    if isinstance(items, dict) and _BATCHED in items:
        batch = {key: value for key, value in items.items() if key != _BATCHED}
    else:
        batch = default_collate(items)
    if "view_logits" in batch:
        batch["view_logits"] = batch["view_logits"].transpose(0, 1)
    return batch


class CalibrationDataModule(WrapperDataModule, ClassificationDataModule):
    """Wraps a classification data module for fitting and evaluating a post-hoc calibrator.

    The classifier is frozen and already trained; the calibrator is fitted on a *calibration
    split* of the wrapped module's **validation** set and evaluated on its test set and on shifted
    copies of it, so calibration data never overlaps test data.

    - ``train_dataloader()``: the calibration split, a random split of the validation set
      stratified by class (``round(calibration_fraction * N_val)`` items, a pure function of
      ``seed``), shuffled by :class:`EpochSeededRandomSampler`.
    - ``val_dataloader()``: the rest of the validation set, in order, for monitoring. With
      ``calibration_fraction == 1.0`` there is no rest and it serves the calibration split again.
    - ``test_dataloader()``: a **list** of loaders: the in-distribution test set ("id"), then its
      corrupted copies (:class:`CorruptedDataset`, for every shift and severity, named
      ``"<shift>-<severity>"``), then every entry of ``ood_datasets`` under its key;
      :attr:`test_set_names` holds the names in the same order (``dataloader_idx`` in
      ``test_step`` indexes it) and :attr:`test_class_subsets` the ``class_subset`` of each set
      (ImageNet-A / -R) or None.

    Batches are ``(images (B, C, H, W), views (B, V, C, H, W), labels (B,))`` with
    ``views=True`` (every set wrapped in :class:`ViewsDataset`: the views of a corrupted image are
    views *of the corrupted image*), else ``(images, labels)``. The views of an item depend only on
    ``(seed, position in its set, view)``: the same validation item gets the same views whatever
    ``calibration_fraction``, and test item ``i`` gets the same random view parameters in every
    shifted copy.

    Default views: :func:`default_view_transforms` for the wrapped module's ``image_shape``; if
    the module exposes its normalisation as ``mean`` / ``std`` attributes (CIFAR, digits with
    ``normalize="standard"``) the views are applied to the exactly un-normalised image, otherwise
    to the image min-max rescaled to [0, 1].

    ``num_classes`` and ``image_shape`` come from the wrapped module (available before setup).

    Args:
        datamodule: a classification data module with ``num_classes``, ``image_shape`` and, after
            ``setup``, ``val_dataset`` and ``test_dataset`` of ``(image tensor, label)``.
        calibration_fraction: share of the validation set in the calibration split, in (0, 1].
        views: add transformed views to every item.
        view_transforms: one callable per view (None: the defaults above).
        shifts: names in :data:`~lightning_losses.datamodules.shifts.CORRUPTIONS` to apply to the
            test set (None or empty: none).
        severities: severities (1..5) of every shift.
        ood_datasets: extra test sets by name (e.g. CIFAR-10-C, ImageNet-R), each of
            ``(image tensor, label)`` in the wrapped module's label space.
        batch_size: items per batch.
        num_workers: loader worker processes.
        seed: seed of the calibration split, the training order, the views and the corruptions.
        id_test: the in-distribution test set: the wrapped module's ``"test"`` set, or the
            ``"heldout"`` rest of its validation set (ImageNet, whose labelled val set is both
            the calibration data and the only ID test data; the shifts apply to it too).
        output_cache: a folder for the classifier's outputs (None: no disk cache, and test sets
            serve images). With a folder, :meth:`cache_outputs` and :meth:`cache_test_outputs`
            store the outputs they compute there (safetensors, one file per split group) under a
            key of the classifier's fingerprint (the caller's ``key``) and every setting of this
            module and of the wrapped one, and load them instead of recomputing when the key
            matches: calibrators of one classifier and one data setting (the CE and CA
            calibrators of a seed) transform the views and run the classifier once. The cache
            trusts that equal settings mean equal data: clear the folder after changing data
            files or the view / corruption code. Needs the default views and no
            ``ood_datasets`` (their contents cannot be keyed).
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        calibration_fraction: float = 0.5,
        views: bool = True,
        view_transforms: Sequence[Callable[[Tensor], Tensor]] | None = None,
        shifts: Sequence[str] | None = ("rotation", "gaussian_noise", "gaussian_blur", "contrast"),
        severities: Sequence[int] = (1, 3, 5),
        ood_datasets: dict[str, Dataset] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        id_test: Literal["test", "heldout"] = "test",
        output_cache: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if output_cache is not None and not isinstance(output_cache, str | os.PathLike):
            raise ValueError(f"output_cache must be None or a folder path, got {output_cache!r}")
        if output_cache is not None and (view_transforms is not None or ood_datasets):
            raise ValueError(
                "output_cache needs the default views and no ood_datasets (custom transforms and "
                "extra data sets cannot be keyed): set output_cache=None"
            )
        if id_test not in ("test", "heldout"):
            raise ValueError(f"id_test must be 'test' or 'heldout', got {id_test!r}")
        if id_test == "heldout" and calibration_fraction >= 1.0:
            raise ValueError("id_test='heldout' needs calibration_fraction < 1")
        self.id_test = id_test
        self._wrap(datamodule)
        for attribute in ("num_classes", "image_shape"):
            if not hasattr(type(datamodule), attribute) and not hasattr(datamodule, attribute):
                raise ValueError(f"datamodule must expose {attribute}")
        if (
            isinstance(calibration_fraction, bool)
            or not isinstance(calibration_fraction, numbers.Real)
            or not 0.0 < calibration_fraction <= 1.0
        ):
            raise ValueError(
                f"calibration_fraction must be a float in (0, 1], got {calibration_fraction!r}"
            )
        if not isinstance(views, bool):
            raise ValueError(f"views must be a bool, got {views!r}")
        if view_transforms is not None:
            view_transforms = list(view_transforms)
            if not view_transforms or not all(callable(t) for t in view_transforms):
                raise ValueError(
                    "view_transforms must be None or a non-empty sequence of callables, got "
                    f"{view_transforms!r}"
                )
        if isinstance(shifts, str):
            raise ValueError(f"shifts must be a sequence of names, got the string {shifts!r}")
        shifts = [] if shifts is None else list(shifts)
        for name in shifts:
            if name not in CORRUPTIONS:
                raise ValueError(f"shifts must be names in {sorted(CORRUPTIONS)}, got {name!r}")
        severities = list(severities)
        for severity in severities:
            if isinstance(severity, bool) or severity not in SEVERITIES:
                raise ValueError(f"severities must be in {SEVERITIES}, got {severity!r}")
        if shifts and not severities:
            raise ValueError("severities must not be empty when shifts are given")
        if len(set(shifts)) != len(shifts) or len(set(severities)) != len(severities):
            raise ValueError(f"shifts and severities must not repeat, got {shifts}, {severities}")
        ood_datasets = dict(ood_datasets or {})
        shift_names = [f"{name}-{severity}" for name in shifts for severity in severities]
        for name, dataset in ood_datasets.items():
            if not isinstance(name, str) or name == "id" or name in shift_names:
                raise ValueError(
                    f"ood_datasets keys must be strings other than 'id' and the shift names "
                    f"{shift_names}, got {name!r}"
                )
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise ValueError(
                    f"ood_datasets[{name!r}] must be a map-style Dataset, got "
                    f"{type(dataset).__name__}"
                )
        self.save_hyperparameters(ignore=["datamodule", "view_transforms", "ood_datasets"])
        self.calibration_fraction = float(calibration_fraction)
        self.views = views
        self.view_transforms = view_transforms
        self.shifts = shifts
        self.severities = severities
        self.ood_datasets = ood_datasets
        self.calibration_indices: Tensor | None = None
        self.heldout_indices: Tensor | None = None
        self.test_datasets: list[Dataset] | None = None
        self.cached: dict[str, CachedOutputs] = {}
        self.cached_test: list[CachedOutputs] = []
        self.output_cache = None if output_cache is None else Path(output_cache)
        self._test_set_names = ["id", *shift_names, *ood_datasets]

    @property
    def num_views(self) -> int:
        """Number of views per item (0 with ``views=False``); the default views need ``setup``
        only to be built, their number (3) is known before."""
        if not self.views:
            return 0
        return 3 if self.view_transforms is None else len(self.view_transforms)

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test loaders, in ``test_dataloader()`` order: ``"id"``, the shifts
        (``"rotation-1"``, ...), then the ``ood_datasets`` keys."""
        return list(self._test_set_names)

    @property
    def test_class_subsets(self) -> list[list[int] | None]:
        """``class_subset`` of every test set (e.g. the 200 ImageNet-A / -R classes) or None,
        in ``test_set_names`` order."""
        subsets: list[list[int] | None] = [None] * len(self._test_set_names)
        for i, name in enumerate(self._test_set_names):
            if name in self.ood_datasets:
                subset = getattr(self.ood_datasets[name], "class_subset", None)
                subsets[i] = None if subset is None else [int(c) for c in subset]
        return subsets

    def _transforms(self) -> list[Callable[[Tensor], Tensor]]:
        if self.view_transforms is None:
            channels, _, size = self.image_shape
            mean, std = _normalisation_of(self.datamodule, channels)
            self.view_transforms = default_view_transforms(channels, size, mean=mean, std=std)
        return list(self.view_transforms)

    def _with_views(self, dataset: Dataset) -> Dataset:
        if not self.views:
            return dataset
        return ViewsDataset(dataset, self._transforms(), seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped module and build the calibration split and / or the test sets.

        ``"fit"`` / ``"validate"`` (or None) builds the calibration and held-out splits of the
        validation set; ``"test"`` / ``"predict"`` (or None) builds the test sets.
        """
        need_fit = stage in (None, "fit", "validate")
        need_test = stage in (None, "test", "predict")
        self.datamodule.trainer = self.trainer
        if need_fit and self.train_dataset is None:
            self.datamodule.setup("fit" if stage is None else stage)
            val = getattr(self.datamodule, "val_dataset", None)
            if val is None:
                raise RuntimeError(
                    f"{type(self.datamodule).__name__} has no val_dataset after setup: the "
                    "calibration split is taken from the validation set"
                )
            test = getattr(self.datamodule, "test_dataset", None)
            if test is not None and val is test:
                raise ValueError(
                    f"{type(self.datamodule).__name__} validates on its test set (e.g. CIFAR "
                    "with val_size=0): the calibration split must be disjoint from the test "
                    "data, give the wrapped module a validation split (val_size > 0)"
                )
            self._split(val)
        if need_test and self.test_datasets is None:
            self.datamodule.setup("test" if stage is None else stage)
            test = getattr(self.datamodule, "test_dataset", None)
            if self.id_test == "heldout":
                test = self._heldout_test()
            if test is None:
                raise RuntimeError(f"{type(self.datamodule).__name__} has no test_dataset")
            val = getattr(self.datamodule, "val_dataset", None)
            if val is not None and val is test:
                raise ValueError(
                    f"{type(self.datamodule).__name__} validates on its test set: the "
                    "calibration split must be disjoint from the test data"
                )
            sets: list[Dataset] = [test]
            for name in self.shifts:
                for severity in self.severities:
                    sets.append(CorruptedDataset(test, name, severity, seed=self.seed))
            sets.extend(self.ood_datasets.values())
            self.test_datasets = [self._with_views(d) for d in sets]
            self.test_dataset = self.test_datasets[0]

    def _heldout_test(self) -> Dataset:
        if self.heldout_indices is None:
            self.datamodule.setup("fit")
            self._split(self.datamodule.val_dataset)
        return Subset(self.datamodule.val_dataset, self.heldout_indices.tolist())

    def _split(self, val: Dataset) -> None:
        targets = dataset_targets(val)
        n = len(targets)
        if self.calibration_fraction == 1.0:
            calibration, heldout = np.arange(n), np.arange(0)
        else:
            calibration_size = int(round(self.calibration_fraction * n))
            heldout, calibration = stratified_split(
                targets, calibration_size, self.seed, name="round(calibration_fraction * N_val)"
            )
        self.calibration_indices = torch.as_tensor(calibration, dtype=torch.int64)
        self.heldout_indices = torch.as_tensor(heldout, dtype=torch.int64)
        val = self._with_views(val)
        self.train_dataset = Subset(val, calibration.tolist())
        if len(heldout):
            self.val_dataset = Subset(val, heldout.tolist())
        else:
            self.val_dataset = self.train_dataset

    def teardown(self, stage: str | None = None) -> None:
        """Delegated to the wrapped module."""
        self.datamodule.teardown(stage)

    @torch.no_grad()
    def cache_outputs(
        self, fn: OutputsFn, device: torch.device | str | None = None, key: str | None = None
    ) -> None:
        """Run a frozen classifier once over the calibration and held-out splits and serve its
        outputs instead of images from then on.

        ``fn(images, views)`` (``views`` None when ``views=False``) returns ``(logits (B, C),
        view_logits (V, B, C) or None)``, e.g. ``PostHocCalibration.classifier_logits``, which
        calls this at the start of ``fit``. Afterwards :meth:`train_dataloader` (same sampler
        and seed) and :meth:`val_dataloader` yield ``{"logits": (B, C), "view_logits": (V, B,
        C), "labels": (B,)}`` (no ``view_logits`` when ``fn`` gave None) and need no workers.
        Test loaders keep serving images (see :meth:`cache_test_outputs`). Call again to
        recompute (e.g. for another classifier); :meth:`clear_cache` goes back to images.

        Args:
            fn: the classifier outputs of a batch.
            device: where the batches are moved before ``fn`` (None: left on the CPU).
            key: the classifier's fingerprint for the ``output_cache`` folder (ignored without
                one; None: neither read nor written): equal keys must mean equal outputs of
                ``fn`` on equal images.
        """
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("cache_outputs needs the calibration split: call setup('fit') first")
        same = self.val_dataset is self.train_dataset
        datasets = [self.train_dataset] if same else [self.train_dataset, self.val_dataset]
        outputs = self._outputs_of(fn, datasets, "fit", device, key)
        self.cached = {"train": outputs[0], "val": outputs[0] if same else outputs[1]}

    @torch.no_grad()
    def cache_test_outputs(
        self, fn: OutputsFn, device: torch.device | str | None = None, key: str | None = None
    ) -> None:
        """Like :meth:`cache_outputs`, for every test set: :meth:`test_dataloader` then yields
        ``{"logits", "view_logits", "labels"}`` batches of the same items in the same order and
        batch size as the image loaders, so a test gives the same metrics either way.
        ``PostHocCalibration`` calls it at the start of ``test`` when ``output_cache`` is set
        (a test set's outputs are kept in memory: (N, (1 + V) * C) floats each).
        """
        if self.test_datasets is None:
            raise RuntimeError("cache_test_outputs needs the test sets: call setup('test') first")
        self.cached_test = self._outputs_of(fn, self.test_datasets, "test", device, key)

    def _outputs_of(
        self,
        fn: OutputsFn,
        datasets: list[Dataset],
        group: str,
        device: torch.device | str | None,
        key: str | None,
    ) -> list[CachedOutputs]:
        """The outputs of ``fn`` on each of ``datasets`` (batches as the image loaders'), from
        the disk cache when ``output_cache`` and ``key`` are set and it holds them."""
        path = self._cache_path(group, key, len(datasets))
        if path is not None and path.exists():
            return _load_outputs(path, len(datasets))
        outputs = [self._run(fn, dataset, device) for dataset in datasets]
        if path is not None:
            _save_outputs(path, outputs)
        return outputs

    def _run(
        self, fn: OutputsFn, dataset: Dataset, device: torch.device | str | None
    ) -> CachedOutputs:
        logits, view_logits, labels = [], [], []
        for batch in self._loader(dataset, "test", shuffle=False):
            if self.views:
                images, views, targets = batch
                views = views.to(device) if device is not None else views
            else:
                (images, targets), views = batch, None
            images = images.to(device) if device is not None else images
            out, out_views = fn(images, views)
            logits.append(out.detach().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.int64).cpu())
            if out_views is not None:
                view_logits.append(out_views.detach().cpu().transpose(0, 1))
        return CachedOutputs(
            torch.cat(logits),
            torch.cat(labels),
            torch.cat(view_logits) if view_logits else None,
        )

    def _cache_path(self, group: str, key: str | None, count: int) -> Path | None:
        """``<output_cache>/<sha256 of the settings>.safetensors`` (None without a folder or
        a key)."""
        if self.output_cache is None or key is None:
            return None
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        import lightning_losses

        wrapped = getattr(self.datamodule, "hparams", None)
        settings = {
            "group": group,
            "sets": count,
            "key": key,
            "module": {k: v for k, v in dict(self.hparams).items() if k not in _NOT_KEYED},
            "wrapped": [type(self.datamodule).__module__, type(self.datamodule).__qualname__],
            "wrapped_settings": {
                k: v for k, v in dict(wrapped or {}).items() if k not in _NOT_KEYED
            },
            "versions": [lightning_losses.__version__, torch.__version__],
        }
        text = json.dumps(settings, sort_keys=True, default=repr)
        return self.output_cache / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"

    def clear_cache(self) -> None:
        """Forget the outputs of :meth:`cache_outputs` and :meth:`cache_test_outputs` (in
        memory; the ``output_cache`` folder stays): the loaders serve images again."""
        self.cached = {}
        self.cached_test = []

    def _cached_loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.cached[split]
        kwargs: dict[str, Any] = {}
        if shuffle:
            kwargs["sampler"] = EpochSeededRandomSampler(dataset, seed=self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_cached, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """The calibration split, shuffled (order fixed by ``seed`` and the epoch)."""
        if self.cached:
            return self._cached_loader("train", shuffle=True)
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        """The held-out rest of the validation set (the calibration split if there is none)."""
        if self.cached:
            return self._cached_loader("val", shuffle=False)
        return super().val_dataloader()

    def test_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        """One loader per test set, in :attr:`test_set_names` order."""
        if self.test_datasets is None:
            raise RuntimeError(
                "CalibrationDataModule.test_datasets is not set: call setup('test') first"
            )
        if self.cached_test:
            return [self._cached_test_loader(c) for c in self.cached_test]
        return [self._loader(d, "test", shuffle=False) for d in self.test_datasets]

    def _cached_test_loader(self, dataset: CachedOutputs) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_cached)
