"""Training an EDM diffusion teacher (an EDM-preconditioned ``UNet2DModel``) on image data."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_losses.checks import check_float, describe
from lightning_losses.diffusion import (
    Denoiser,
    EDMPrecond,
    edm_heun_sampler,
    edm_loss,
    load_denoiser,
    split_real_batch,
    trusted_sigmas,
    unet_for_images,
)
from lightning_losses.diffusion.checks import check_diffusion_images
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.modules.ema import ema_update
from lightning_losses.modules.schedulers import optimizer_config

#: The command that trains and exports the digits teacher the distillation configs load.
TEACHER_COMMAND = "lightning-losses fit --config configs/distillation/digits_teacher.yaml"


def load_teacher(path: str | os.PathLike[str]) -> Denoiser:
    """:func:`~lightning_losses.diffusion.load_denoiser`, with how to make the digits teacher.

    Raises:
        FileNotFoundError: when ``path`` holds no teacher (the message names
            :data:`TEACHER_COMMAND`).
        ValueError: as :func:`~lightning_losses.diffusion.load_denoiser`.
    """
    try:
        return load_denoiser(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Train and export the digits teacher first: {TEACHER_COMMAND} (it writes "
            "runs/distillation/digits_teacher/export), or set model.init_args.teacher_path to a "
            "local teacher folder"
        ) from err


def check_teacher_classes(teacher: Denoiser, num_classes: int | None, conditional: bool) -> None:
    """Raise ValueError unless the teacher's classes fit ``class_conditional`` / ``num_classes``."""
    if conditional:
        if teacher.num_classes is None:
            raise ValueError(
                "class_conditional=True but the teacher is unconditional (num_classes=None)"
            )
        if num_classes is not None and num_classes != teacher.num_classes:
            raise ValueError(
                f"num_classes={num_classes} (from the data) but the teacher has "
                f"{teacher.num_classes} classes"
            )
    elif teacher.num_classes is not None:
        raise ValueError(
            f"the teacher is class conditional ({teacher.num_classes} classes): set "
            "class_conditional=True"
        )


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images, labels or None)`` of a batch (:func:`~lightning_losses.diffusion.
    split_real_batch`; a batch without images is an error here)."""
    real = split_real_batch(batch)
    if real.images is None:
        raise ValueError(
            "a batch must be a (B, C, H, W) image tensor, an (images, labels, ...) sequence or a "
            f"dict with 'images' (and 'labels'), got {describe(batch)}"
        )
    return real.images, real.labels


class DiffusionTeacher(L.LightningModule):
    """An EDM-preconditioned UNet trained with the EDM loss; the teacher of the distillations.

    The denoiser is :class:`~lightning_losses.diffusion.EDMPrecond` around ``unet`` (or around
    :func:`~lightning_losses.diffusion.unet_for_images` built from ``in_channels``,
    ``sample_size``, ``channels``, ``layers_per_block``, ``attention``), trained on clean images
    :math:`x \\in [-1, 1]` with EDM's loss (:func:`~lightning_losses.diffusion.edm_loss`, where
    the formula is; :math:`\\ln\\sigma \\sim \\mathcal{N}(P_{mean}, P_{std}^2)`).

    A constant-decay exponential moving average of the denoiser's weights
    (:func:`~lightning_losses.modules.ema.ema_update`) is updated after every optimizer step. It
    lives in :attr:`ema` (a frozen copy of the denoiser, outside the optimizer, inside the
    ``state_dict``: checkpoints resume it) and is what :meth:`sample` and :meth:`save_pretrained`
    use by default.

    Class conditioning is opt-in (``class_conditional=True``): the CLI always links
    ``num_classes`` from the data module, which alone changes nothing. A conditional teacher
    reads the labels from ``(images, labels)`` batches.

    Batches are image tensors, ``(images, labels, ...)`` sequences or dicts with ``images``
    (``labels``). Images must be ``(B, in_channels, sample_size, sample_size)`` and lie in
    [-1, 1]: for :class:`~lightning_losses.datamodules.DigitsDataModule` use
    ``normalize="symmetric"``; anything else raises ValueError.

    Logged: ``train/loss`` (step and epoch), ``val/loss`` and ``val/loss_ema`` (the EDM loss of
    the trained and the EMA denoiser, with the noise of a fixed seed per batch, so epochs compare
    with little variance), ``test/loss`` and ``test/loss_ema``.

    Args:
        unet: a diffusers ``UNet2DModel`` (positional time embedding, ``out_channels ==
            in_channels``); None to build one with :func:`unet_for_images`.
        in_channels: image channels of the built UNet (ignored when ``unet`` is given).
        sample_size: image side of the built UNet (ignored when ``unet`` is given).
        num_classes: number of classes (linked from the data module by the CLI); used only when
            ``class_conditional``.
        class_conditional: condition the UNet on class labels (``num_class_embeds``).
        channels: channels of each resolution level of the built UNet.
        layers_per_block: ResNet layers per level of the built UNet.
        attention: attention blocks below the full resolution of the built UNet.
        sigma_data: :math:`\\sigma_d`, the data standard deviation (0.5 for [-1, 1] images).
        sigma_min: the smallest noise level (EDM: 0.002), the sampler's last nonzero level.
        sigma_max: the largest noise level (EDM: 80), the sampler's first level.
        p_mean: mean of :math:`\\ln\\sigma` in training (EDM: -1.2).
        p_std: standard deviation of :math:`\\ln\\sigma` in training (EDM: 1.2).
        optimizer: callable building the optimizer from the denoiser's parameters (Adam with
            EDM's lr 1e-3 if unset).
        lr_scheduler: optional callable building the LR scheduler from the optimizer.
        scheduler_interval: step the scheduler every ``"step"`` (warm-ups) or ``"epoch"``.
        ema_decay: the constant EMA decay :math:`\\beta` in [0, 1] (0: the EMA is the
            current weights; 1: it stays at the initial ones). After ``k`` steps the EMA still
            holds :math:`\beta^k` of the random initial weights: for short runs pick
            :math:`\beta` with :math:`\beta^k` negligible (0.995 for ~1,000 steps).
        sample_steps: Heun sampler noise levels used by :meth:`sample` by default (EDM: 18).
        val_seed: seed of the validation noise (batch ``i`` uses ``val_seed + i``).
    """

    def __init__(
        self,
        unet: nn.Module | None = None,
        in_channels: int = 1,
        sample_size: int = 8,
        num_classes: int | None = None,
        class_conditional: bool = False,
        channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention: bool = False,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "step",
        ema_decay: float = 0.999,
        sample_steps: int = 18,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        check_float(p_mean, "p_mean")
        check_float(p_std, "p_std", minimum=0.0)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        save_config_hyperparameters(self, ["unet", "optimizer", "lr_scheduler"])
        if unet is None:
            if class_conditional and num_classes is None:
                raise ValueError(
                    "class_conditional=True needs num_classes (the CLI links it from the data "
                    "module; in Python pass num_classes=...)"
                )
            unet = unet_for_images(
                in_channels,
                sample_size,
                channels=channels,
                layers_per_block=layers_per_block,
                num_classes=num_classes if class_conditional else None,
                attention=attention,
            )
        self.denoiser = EDMPrecond(unet, sigma_data, sigma_min, sigma_max)
        unet_classes = self.denoiser.num_classes
        if class_conditional and unet_classes is None:
            raise ValueError(
                "class_conditional=True but the given unet is unconditional (its "
                "num_class_embeds is None): build it with num_class_embeds=num_classes"
            )
        if not class_conditional and unet_classes is not None:
            raise ValueError(
                f"the given unet is class conditional (num_class_embeds={unet_classes}): set "
                "class_conditional=True"
            )
        if class_conditional and num_classes is not None and num_classes != unet_classes:
            raise ValueError(
                f"num_classes={num_classes} (from the data) but the unet embeds {unet_classes} "
                "classes"
            )
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.class_conditional = class_conditional
        self.num_classes = unet_classes if class_conditional else num_classes
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.ema_decay = float(ema_decay)
        self.sample_steps = int(sample_steps)
        self.val_seed = int(val_seed)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self._ema_seen_step: int | None = None
        self._range_warned = False

    # --------------------------------------------------------------------------------------
    # The denoiser

    @property
    def in_channels(self) -> int:
        return self.denoiser.in_channels

    @property
    def sample_size(self) -> int | tuple[int, int] | None:
        return self.denoiser.sample_size

    def forward(
        self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """``D(x; sigma)`` of the trained (not the EMA) denoiser."""
        return self.denoiser(x, sigma, class_labels)

    def _image_hw(self) -> tuple[int, int] | None:
        size = self.sample_size
        if size is None:
            return None
        return (size, size) if isinstance(size, int) else tuple(size)

    def check_images(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, C, H, W)`` at the UNet's shape, in [-1, 1]."""
        looks_unscaled = check_diffusion_images(x, self.in_channels, self._image_hw())
        if looks_unscaled and not self._range_warned:
            self._range_warned = True
            rank_zero_warn(
                "a batch lies in [0, 1], which looks like [0, 1] data; diffusion teachers "
                'expect [-1, 1] (normalize="symmetric")'
            )

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        if not self.class_conditional:
            return None
        if labels is None:
            raise ValueError(
                "the teacher is class conditional but the batch has no labels: use "
                "(images, labels) batches or class_conditional=False"
            )
        return labels

    def compute_loss(
        self,
        x: Tensor,
        class_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        denoiser: nn.Module | None = None,
    ) -> Tensor:
        """The EDM loss of ``denoiser`` (the trained one by default) on a clean batch."""
        with trusted_sigmas():  # exp of a normal draw: finite and > 0
            return edm_loss(
                self.denoiser if denoiser is None else denoiser,
                x,
                class_labels=class_labels,
                p_mean=self.p_mean,
                p_std=self.p_std,
                sigma_data=self.sigma_data,
                generator=generator,
            )

    # --------------------------------------------------------------------------------------
    # Lightning hooks

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = _split_batch(batch)
        self.check_images(x)
        loss = self.compute_loss(x, self._labels(labels))
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> dict[str, Tensor]:
        x, labels = _split_batch(batch)
        self.check_images(x)
        labels = self._labels(labels)
        values = {}
        for name, denoiser in (("loss", self.denoiser), ("loss_ema", self.ema)):
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed + batch_idx)
            values[f"{stage}/{name}"] = self.compute_loss(x, labels, generator, denoiser)
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        return values

    @torch.no_grad()
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, batch_idx, "val")

    @torch.no_grad()
    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, batch_idx, "test")

    def on_train_start(self) -> None:
        self._ema_seen_step = self.trainer.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: one EMA update per step, also with accumulation.
        step = self.trainer.global_step
        if self._ema_seen_step is None:
            self._ema_seen_step = step
        if step > self._ema_seen_step:
            self.update_ema()
            self._ema_seen_step = step

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.denoiser.parameters())
        return optimizer_config(optimizer, self.lr_scheduler, self.scheduler_interval)

    # --------------------------------------------------------------------------------------
    # EMA, sampling, export

    def update_ema(self, decay: float | None = None) -> None:
        """One EMA update (:func:`~lightning_losses.modules.ema.ema_update`); every rank does the
        same update on the same weights."""
        ema_update(self.ema, self.denoiser, self.ema_decay if decay is None else decay)

    def _noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        hw = self._image_hw()
        if hw is None:
            raise ValueError("the UNet has no sample_size: pass noise of the shape to sample")
        device = generator.device if generator is not None else self.device
        noise = torch.randn((n, self.in_channels, *hw), generator=generator, device=device)
        return noise.to(self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        class_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        num_steps: int | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """``n`` images in [-1, 1] (about) from EDM's Heun sampler, with the EMA weights.

        :math:`x_N = \\sigma_{max} z`, :math:`z \\sim \\mathcal{N}(0, I)`, then Heun steps of
        :math:`dx/d\\sigma = (x - D(x;\\sigma))/\\sigma` over ``karras_sigmas(num_steps,
        sigma_min, sigma_max)`` and a final Euler step to 0 (``2 * num_steps - 1`` evaluations).

        Args:
            n: number of images.
            class_labels: ``(n,)`` integer labels, required by a class-conditional teacher and
                refused by an unconditional one.
            generator: draws the noise (on its own device) when ``noise`` is None.
            use_ema: sample with the EMA (default) or the trained weights.
            num_steps: noise levels (``sample_steps`` if None).
            noise: standard normal ``(n, C, H, W)`` noise to start from instead.

        Returns:
            A float32 ``(n, C, H, W)`` tensor on the module's device.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.class_conditional and class_labels is None:
            raise ValueError(
                f"the teacher is class conditional ({self.num_classes} classes): pass "
                "class_labels, an integer tensor of shape (n,)"
            )
        if not self.class_conditional and class_labels is not None:
            raise ValueError("class_labels were given but the teacher is unconditional")
        if noise is None:
            noise = self._noise(n, generator)
        elif noise.shape[0] != n:
            raise ValueError(f"noise holds {noise.shape[0]} samples, not n={n}")
        if class_labels is not None:
            class_labels = class_labels.to(self.device)
        denoiser = self.ema if use_ema else self.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            return edm_heun_sampler(
                denoiser,
                noise.to(self.device),
                num_steps=self.sample_steps if num_steps is None else num_steps,
                class_labels=class_labels,
            )
        finally:
            denoiser.train(was_training)

    def edm_config(self) -> dict[str, Any]:
        """The JSON-able description written next to the UNet by :meth:`save_pretrained`."""
        return self.denoiser.edm_config()

    def save_pretrained(
        self, path: str | os.PathLike[str], use_ema: bool = True, overwrite: bool = False
    ) -> Path:
        """Write the EMA (``use_ema=False``: the trained) denoiser to a local folder that
        :meth:`from_pretrained` loads (:meth:`EDMPrecond.save_pretrained`: ``unet/`` +
        ``edm_config.json``, with ``"weights": "ema" | "trained"``); returns the folder.

        Raises:
            FileExistsError: when ``path`` already holds a saved model and ``overwrite`` is
                False.
        """
        denoiser = self.ema if use_ema else self.denoiser
        extra = {"weights": "ema" if use_ema else "trained"}
        return denoiser.save_pretrained(path, overwrite=overwrite, extra_config=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> EDMPrecond:
        """The :class:`EDMPrecond` denoiser saved by :meth:`save_pretrained` (eval mode; local
        folders only, :meth:`EDMPrecond.from_pretrained`)."""
        return EDMPrecond.from_pretrained(path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _refuse_other_checkpoints(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's loader, refusing a checkpoint of another module with a clear error."""
        if isinstance(checkpoint_path, str | os.PathLike) and Path(checkpoint_path).is_file():
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            _refuse_other_checkpoints(checkpoint, checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


def _refuse_other_checkpoints(checkpoint: dict[str, Any], path: object = "the checkpoint") -> None:
    keys = checkpoint.get("state_dict", {}).keys()
    if keys and not any(k.startswith("denoiser.") for k in keys):
        heads = sorted({k.split(".")[0] for k in keys})
        raise ValueError(
            f"{path} is not a DiffusionTeacher checkpoint (its weights are {heads}, e.g. a "
            "distillation module's): load it with the class that wrote it, e.g. "
            "DMDDistillation.load_from_checkpoint"
        )
