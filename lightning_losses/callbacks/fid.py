"""FID of a generative module's samples during training (torchmetrics' FID).

:class:`FIDCallback` evaluates the Frechet distance (the formula is in
:mod:`lightning_losses.metrics.digits_fid`) between the features of real images (their mean and
covariance computed once and kept) and of ``num_samples`` images from ``pl_module.sample``
(the EMA generator of the distillation modules), always from the same noise. The features come
from one of

- ``2048`` (or 64 / 192 / 768): torchmetrics' Inception-v3 (torch-fidelity's FID weights, the
  TensorFlow-compatible resize), the usual FID; the weights are downloaded once, which fails
  offline: then pass a local weights file or a module;
- a path (str) to that weights file on disk (the 2048-d pool features);
- ``"digits"``: digits-FID (:mod:`lightning_losses.metrics.digits_fid`), the committed 8x8
  digits classifier's features against ALL 1,797 real digits (not comparable with Inception
  FID);
- an ``nn.Module`` mapping images in [-1, 1] ``(B, C, H, W)`` to ``(B, F)`` features.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_losses.callbacks._hooks import StepScheduleHooks, generation_step
from lightning_losses.diffusion.batches import split_real_batch
from lightning_losses.diffusion.checks import RANGE_TOLERANCE
from lightning_losses.metrics.digits_fid import (
    DIGITS_FID_NUM_SAMPLES,
    FIDFeatures,
    digits_fid_metric,
    fid_metric,
)

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = [
    "INCEPTION_FEATURES",
    "INCEPTION_WEIGHTS_FILE",
    "FIDCallback",
    "InceptionOnImages",
    "generation_step",
    "inception_features",
    "sample_in_chunks",
]

#: The Inception-v3 layers torchmetrics' FID offers (2048: the pool features of standard FID).
INCEPTION_FEATURES = (64, 192, 768, 2048)
#: The name of the FID Inception weights file torch-fidelity downloads.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_REAL_SPLITS = ("train", "val", "test")


class InceptionOnImages(nn.Module):
    """Feed [-1, 1] images to torchmetrics' Inception: clamp, to uint8 [0, 255], grey to RGB.

    :math:`u = \\mathrm{round}(127.5 (x + 1))` as uint8 (what an 8-bit image file holds), one
    channel repeated to three; the Inception resizes to 299x299 itself.
    """

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception FID takes (B, 1 or 3, H, W) images, got {tuple(images.shape)}"
            )
        pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.inception(pixels.contiguous())


def _offline_message(feature: int, url: str, err: BaseException) -> str:
    return (
        f"could not get the Inception-v3 FID weights for feature={feature} ({type(err).__name__}: "
        f"{err}); they are downloaded from {url}, which needs the network. Offline, pass a local "
        f'copy of that file: feature="/path/to/{INCEPTION_WEIGHTS_FILE}" (on a machine with '
        f"network it lands in ~/.cache/torch/hub/checkpoints/), or an nn.Module feature "
        'extractor, or feature="digits" for digits-FID on 8x8 digits'
    )


def inception_features(feature: int = 2048, weights_path: str | None = None) -> FIDFeatures:
    """torchmetrics' Inception-v3 feature extractor on [-1, 1] images, as :class:`FIDFeatures`.

    Args:
        feature: the layer, one of :data:`INCEPTION_FEATURES`.
        weights_path: a local FID Inception weights file (:data:`INCEPTION_WEIGHTS_FILE`);
            None: download it (cached by torch.hub).

    Raises:
        ValueError: for another ``feature``, or a weights file that is not a plain state dict.
        FileNotFoundError: when ``weights_path`` does not exist.
        ModuleNotFoundError: when torch-fidelity is not installed.
        RuntimeError: when the weights cannot be downloaded (the message says what to pass).
    """
    if isinstance(feature, bool) or feature not in INCEPTION_FEATURES:
        raise ValueError(f"feature must be one of {INCEPTION_FEATURES}, got {feature!r}")
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fidelity
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise ModuleNotFoundError(
            "Inception FID needs torch-fidelity: pip install torch-fidelity (or "
            "lightning-losses[fid]); or pass an nn.Module feature extractor, or "
            'feature="digits"'
        ) from err
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"feature={str(weights_path)!r}: no Inception weights file there (expected a "
                f"local copy of {INCEPTION_WEIGHTS_FILE}, from {fidelity.URL_INCEPTION_V3})"
            )
        # torch-fidelity loads the file with weights_only=False; refuse anything a safe load
        # cannot read, so no pickled code ever runs.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"feature={str(weights_path)!r} is not a plain state dict of Inception weights "
                f"(torch.load(weights_only=True) failed: {err})"
            ) from err
        inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=str(path),
            antialias=False,
        )
    else:
        try:
            inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(feature)], antialias=False
            )
        except Exception as err:
            raise RuntimeError(_offline_message(feature, fidelity.URL_INCEPTION_V3, err)) from err
    return FIDFeatures(InceptionOnImages(inception), feature)


def sample_in_chunks(
    pl_module: L.LightningModule, num_samples: int, batch_size: int, seed: int
) -> Iterator[Tensor]:
    """``pl_module.sample(n, generator=torch.Generator().manual_seed(seed))`` in chunks.

    One CPU generator seeded with ``seed`` feeds every chunk in turn, so the noise is the same
    at every call whatever the device. The module is in eval mode (and without gradient) while
    it samples and goes back to its mode afterwards.

    Raises:
        TypeError: when the module has no ``sample`` method.
        ValueError: when a chunk is not an ``(n, C, H, W)`` floating-point tensor.
    """
    sample = getattr(pl_module, "sample", None)
    if not callable(sample):
        raise TypeError(
            f"{type(pl_module).__name__} has no sample(n, generator=...) method to draw images "
            "from (the distillation modules have one)"
        )
    generator = torch.Generator().manual_seed(int(seed))
    was_training = pl_module.training
    pl_module.eval()
    try:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            with torch.no_grad():
                images = sample(n, generator=generator)
            if (
                not isinstance(images, Tensor)
                or images.ndim != 4
                or images.shape[0] != n
                or not images.is_floating_point()
            ):
                shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
                raise ValueError(
                    f"{type(pl_module).__name__}.sample({n}) must return a float (n, C, H, W) "
                    f"tensor in [-1, 1], got {shape}"
                )
            yield images.detach()
    finally:
        pl_module.train(was_training)


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= 1{extra}, got {value!r}")


class FIDCallback(StepScheduleHooks):
    """FID of ``pl_module.sample`` against real images, every ``every_n_steps`` and at the end.

    **When.** After a training batch whose step (``pl_module.generator_steps`` if the module has
    that buffer, else ``trainer.global_step``) is a positive multiple of ``every_n_steps`` (once
    per step value: the generator's counter stays put over the fake-denoiser-only batches), and
    at the end of training when ``on_train_end`` (unless that step was just evaluated).

    **Real statistics.** Computed once, at the first evaluation, from the data module's
    ``<real>_dataloader()`` (images in [-1, 1]; the first ``max_real`` of them), then kept
    (torchmetrics ``reset_real_features=False``). With a shuffling loader and ``max_real`` the
    subset is the loader's first order. ``feature="digits"`` ignores ``real`` and ``max_real``:
    its real statistics are all 1,797 digits, computed at construction.

    **Samples.** ``num_samples`` images from ``pl_module.sample(n, generator=...)`` in chunks of
    ``batch_size``, the noise drawn from one CPU ``torch.Generator`` seeded with ``seed``: the
    same noise at every evaluation, on any device. The module is in eval mode while sampling.
    Samples are clamped to [-1, 1] (what an image file would hold); non-finite samples give NaN
    and a warning instead of stopping the run.

    **Logged.** ``name`` (default ``"fid"``) goes to every logger at ``trainer.global_step`` and
    into ``trainer.callback_metrics`` (which ``ModelCheckpoint(monitor="fid")`` reads);
    :attr:`history` keeps ``(step, fid)`` pairs with the step defined above. The callback logs
    through the loggers itself because ``LightningModule.log`` is refused in ``on_train_end``
    and would drop values between ``log_every_n_steps``.

    **DDP.** Rank 0 computes everything (real statistics from the unsharded loader, every
    sample, the distance) and broadcasts the value, so a multi-process run reports exactly what
    one process reports for the same weights; the other ranks wait at the broadcast (make the
    strategy's ``timeout`` longer than one evaluation for very large ``num_samples``). Sharding
    the samples over the ranks would be faster but would sum the features in another order
    (and draw the noise differently), so the number would depend on the world size.

    Args:
        feature: 2048 / 64 / 192 / 768 (Inception-v3 layers; downloads the weights), a path to
            a local Inception weights file, ``"digits"`` (digits-FID), or an ``nn.Module``
            mapping [-1, 1] images ``(B, C, H, W)`` to ``(B, F)`` features (F from its
            ``num_features`` attribute, else from one forward of the first real batch).
        num_samples: generated images per evaluation (digits-FID's reference: 2,000).
        every_n_steps: evaluate every that many steps (see **When**); None: only at the end.
        batch_size: images per ``sample`` call and per feature-network call.
        real: the data module's split for the real statistics, ``"train"``, ``"val"`` or
            ``"test"``.
        max_real: at most this many real images (None: the whole split).
        seed: seed of the generated noise.
        name: the logged metric's name.
        on_train_end: also evaluate when training ends.

    Raises:
        ValueError: for bad arguments.
        FileNotFoundError: when ``feature`` is a path that does not exist.
        RuntimeError: when the default Inception weights cannot be downloaded (the message says
            how to pass a local file or a module).
    """

    def __init__(
        self,
        feature: int | str | nn.Module = 2048,
        num_samples: int = DIGITS_FID_NUM_SAMPLES,
        every_n_steps: int | None = 500,
        batch_size: int = 250,
        real: str = "train",
        max_real: int | None = None,
        seed: int = 0,
        name: str = "fid",
        on_train_end: bool = True,
    ) -> None:
        super().__init__()
        _check_positive("num_samples", num_samples)
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
        _check_positive("every_n_steps", every_n_steps, allow_none=True)
        _check_positive("batch_size", batch_size)
        _check_positive("max_real", max_real, allow_none=True)
        if real not in _REAL_SPLITS:
            raise ValueError(f"real must be one of {_REAL_SPLITS}, got {real!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.real = real
        self.max_real = max_real
        self.seed = int(seed)
        self.name = name
        # Not ``self.on_train_end``: that would shadow the hook of the same name.
        self.evaluate_on_train_end = bool(on_train_end)
        #: ``(step, fid)`` of every evaluation, in order.
        self.history: list[tuple[int, float]] = []
        self.metric: FrechetInceptionDistance | None = None
        self._network: nn.Module | None = None
        self._last_step: int | None = None
        self.mode, self.feature_description = self._build(feature)

    def _build(self, feature: int | str | nn.Module) -> tuple[str, str]:
        if isinstance(feature, str) and feature == "digits":
            self.metric = digits_fid_metric()
            return "digits", "digits"
        if isinstance(feature, str):
            self._set_network(inception_features(2048, weights_path=feature))
            return "inception", f"inception-2048:{feature}"
        if isinstance(feature, int) and not isinstance(feature, bool):
            if feature not in INCEPTION_FEATURES:
                raise ValueError(
                    f"feature must be one of {INCEPTION_FEATURES} (Inception layers), a weights "
                    f'path, "digits" or an nn.Module, got {feature!r}'
                )
            self._set_network(inception_features(feature))
            return "inception", f"inception-{feature}"
        if isinstance(feature, nn.Module):
            num_features = getattr(feature, "num_features", None)
            if isinstance(num_features, Tensor):
                num_features = int(num_features.item())
            if isinstance(num_features, int) and not isinstance(num_features, bool):
                self._set_network(FIDFeatures(feature, num_features))
            else:
                self._network = feature.eval()  # F is read from the first real batch
            return "module", type(feature).__name__
        raise ValueError(
            f"feature must be an int in {INCEPTION_FEATURES}, a path to Inception weights, "
            f'"digits" or an nn.Module, got {type(feature).__name__}'
        )

    def _set_network(self, network: FIDFeatures) -> None:
        self._network = network
        self.metric = fid_metric(network, network.num_features)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, feature=self.feature_description)

    @property
    def real_ready(self) -> bool:
        """Whether the real statistics are in (they are then kept)."""
        return self.metric is not None and int(self.metric.real_features_num_samples) > 0

    # --------------------------------------------------------------------------------------
    # Computation (usable without a Trainer)

    def _real_images(self, datamodule: Any) -> Iterator[Tensor]:
        loader_fn = getattr(datamodule, f"{self.real}_dataloader", None)
        if datamodule is None or not callable(loader_fn):
            raise ValueError(
                f"FIDCallback(real={self.real!r}) reads the real images from the data module's "
                f"{self.real}_dataloader(): fit with a LightningDataModule that has one (or use "
                'feature="digits")'
            )
        seen = 0
        for batch in loader_fn():
            images = split_real_batch(batch).images
            if images is None:
                raise ValueError(
                    f"the {self.real} loader's batches hold no (B, C, H, W) images for FID"
                )
            if self.max_real is not None:
                images = images[: self.max_real - seen]
            low, high = (float(v) for v in torch.aminmax(images.detach().float()))
            if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"FID real images must lie in [-1, 1] like the samples, got values in "
                    f'[{low:.3g}, {high:.3g}]: use normalize="symmetric" data'
                )
            seen += images.shape[0]
            yield images
            if self.max_real is not None and seen >= self.max_real:
                return

    @torch.no_grad()
    def compute_real_statistics(
        self, datamodule: Any, device: torch.device | str | None = None
    ) -> int:
        """Accumulate the real statistics (once; later calls do nothing). Returns their count.

        Raises:
            ValueError: without a suitable loader, for images outside [-1, 1], or with fewer
                than 2 real images.
        """
        if self.real_ready:
            return int(self.metric.real_features_num_samples)
        count = 0
        for images in self._real_images(datamodule):
            if device is not None:
                images = images.to(device)
            images = images.float().clamp(-1.0, 1.0)
            if self.metric is None:  # an nn.Module without num_features: F from this batch
                num_features = self._network.to(images.device)(images).shape[-1]
                self._set_network(FIDFeatures(self._network, int(num_features)))
            self.metric = self.metric.to(images.device)
            self.metric.update(images, real=True)
            count += images.shape[0]
        if count < 2:
            raise ValueError(f"FID needs >= 2 real images, the {self.real} loader gave {count}")
        return count

    @torch.no_grad()
    def compute(self, pl_module: L.LightningModule, datamodule: Any = None) -> float:
        """FID of ``num_samples`` samples of ``pl_module`` (fixed noise) against the real
        statistics (computed from ``datamodule`` first if needed). One process, no logging."""
        device = getattr(pl_module, "device", torch.device("cpu"))
        if not self.real_ready:
            self.compute_real_statistics(datamodule, device)
        metric = self.metric.to(device)
        self.metric = metric
        metric.reset()  # the generated side only
        chunks = sample_in_chunks(pl_module, self.num_samples, self.batch_size, self.seed)
        with closing(chunks):  # restores the module's mode even when we stop early
            for images in chunks:
                if not bool(torch.isfinite(images).all()):
                    rank_zero_warn(f"FIDCallback: non-finite samples, {self.name} = nan")
                    metric.reset()
                    return math.nan
                metric.update(images.float().clamp(-1.0, 1.0), real=False)
        value = float(metric.compute())
        metric.reset()
        return value

    # --------------------------------------------------------------------------------------
    # Hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._last_step = None
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(
                f"FIDCallback needs {type(pl_module).__name__}.sample(n, generator=...) (the "
                "distillation modules have it)"
            )
        if self.mode != "digits" and trainer.datamodule is None:
            raise ValueError(
                f"FIDCallback(real={self.real!r}) reads real images from the data module: pass "
                'datamodule=... to fit (or use feature="digits")'
            )

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Compute on rank 0, broadcast, record in :attr:`history`, log. Returns the value."""
        step = generation_step(trainer, pl_module)
        value = self.compute(pl_module, trainer.datamodule) if trainer.is_global_zero else None
        value = float(trainer.strategy.broadcast(value, src=0))
        self._last_step = step
        self.history.append((step, value))
        trainer.callback_metrics[self.name] = torch.tensor(value, dtype=torch.float64)
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value}, step=trainer.global_step)
        return value

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.evaluate(trainer, pl_module)

    def _runs_on_train_end(self) -> bool:
        return self.evaluate_on_train_end

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")
