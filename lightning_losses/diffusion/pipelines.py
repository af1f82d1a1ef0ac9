"""A distilled one-step generator as a diffusers pipeline (:class:`OneStepPipeline`).

A one-step generator of :mod:`lightning_losses.modules.distillation` maps standard normal noise
to an image with ONE evaluation of a denoiser at the generator noise level :math:`\\sigma_g`:

.. math::

    x = D(\\sigma_g z;\\ \\sigma_g, c), \\qquad z \\sim \\mathcal{N}(0, I_{C \\times H \\times W}),

with ``D`` an :class:`~lightning_losses.diffusion.EDMPrecond` (EDM scalings around a
``UNet2DModel``) or a :class:`~lightning_losses.diffusion.DiffusersEpsDenoiser` (a DDPM
``UNet2DModel`` + scheduler, read in EDM sigma space). No stock diffusers pipeline evaluates a
UNet with these scalings in one step, so :class:`OneStepPipeline` does: it is a
``DiffusionPipeline`` whose components are the UNet (and, for a DDPM generator, its scheduler)
and whose config holds the scalars that rebuild the denoiser. ``save_pretrained`` writes a
standard diffusers folder (``model_index.json``, ``unet/``, ``scheduler/``) and
``OneStepPipeline.from_pretrained(folder)`` (a LOCAL folder; nothing is downloaded with
``HF_HUB_OFFLINE=1``) returns an equal pipeline. Load it with ``OneStepPipeline.from_pretrained``,
not ``DiffusionPipeline.from_pretrained``: the latter looks the class name up in diffusers.

This module imports diffusers (``DiffusionPipeline`` is its base class); ``lightning_losses.
diffusion`` exports it lazily, so importing the package still does not import diffusers.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from torch import Tensor, nn

from lightning_losses.diffusion.denoisers import Denoiser, DiffusersEpsDenoiser, EDMPrecond

__all__ = ["PARAMETERIZATIONS", "OneStepPipeline", "one_step_pipeline_from_denoiser"]

#: How the pipeline reads its UNet: EDM preconditioning, or a DDPM model + scheduler.
PARAMETERIZATIONS: tuple[str, ...] = ("edm", "eps")
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt")


def _unwrap(module: nn.Module) -> nn.Module:
    # torch.compile wraps a module in an OptimizedModule that keeps the original in _orig_mod.
    return getattr(module, "_orig_mod", module)


class OneStepPipeline(DiffusionPipeline):
    """One-step sampling of a distilled generator: :math:`x = D(\\sigma_g z; \\sigma_g, c)`.

    ``parameterization="edm"`` rebuilds ``EDMPrecond(unet, sigma_data, sigma_min, sigma_max)``:

    .. math::

        D(x; \\sigma) = \\frac{\\sigma_d^2}{\\sigma^2 + \\sigma_d^2}\\, x
            + \\frac{\\sigma \\sigma_d}{\\sqrt{\\sigma^2 + \\sigma_d^2}}\\,
            F\\Big(\\frac{x}{\\sqrt{\\sigma^2 + \\sigma_d^2}};\\ \\tfrac14 \\ln\\sigma\\Big);

    ``parameterization="eps"`` rebuilds ``DiffusersEpsDenoiser(unet, scheduler,
    prediction_type)``: with :math:`\\bar\\alpha = 1 / (1 + \\sigma^2)` and the timestep
    :math:`t(\\sigma)` interpolated over the scheduler's table, for epsilon prediction
    :math:`D(x; \\sigma) = x - \\sigma\\, F(x / \\sqrt{1 + \\sigma^2};\\ t(\\sigma))`.

    The denoiser is rebuilt from the current components at every call (a cheap wrapper around
    the same UNet), so ``pipeline.to(device, dtype)`` and replacing ``pipeline.unet`` just work.

    Args:
        unet: the generator's ``UNet2DModel`` ("positional" time embedding).
        scheduler: the DDPM-style scheduler of an "eps" generator (its ``alphas_cumprod``
            define the noise levels); must be None for "edm".
        parameterization: "edm" or "eps".
        generator_sigma: :math:`\\sigma_g` > 0, the noise level of the one step.
        sigma_data: EDM's :math:`\\sigma_d` ("edm" only; None for "eps").
        sigma_min: the EDM denoiser's smallest noise level ("edm" only; None for "eps", whose
            range comes from the scheduler).
        sigma_max: the EDM denoiser's largest noise level ("edm" only).
        prediction_type: what the "eps" UNet predicts ("epsilon", "v_prediction", "sample");
            None: the scheduler's. Must be None for "edm".
        num_classes: the number of classes of a class-conditional generator (must equal the
            UNet's ``num_class_embeds``); None when unconditional.

    Raises:
        ValueError: when the arguments do not describe a valid denoiser (wrong UNet type, a
            scheduler given to or missing from the wrong parameterization, sigma <= 0,
            ``num_classes`` disagreeing with the UNet).
    """

    # diffusers reads this class attribute: an "edm" pipeline saves and loads without scheduler.
    _optional_components = ["scheduler"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin | None = None,
        parameterization: str = "edm",
        generator_sigma: float = 80.0,
        sigma_data: float | None = 0.5,
        sigma_min: float | None = 0.002,
        sigma_max: float | None = 80.0,
        prediction_type: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
            )
        if not isinstance(_unwrap(unet), UNet2DModel):
            raise ValueError(
                f"unet must be a diffusers UNet2DModel, got {type(_unwrap(unet)).__name__}"
            )
        if isinstance(generator_sigma, bool) or not (
            isinstance(generator_sigma, int | float)
            and math.isfinite(generator_sigma)
            and generator_sigma > 0
        ):
            raise ValueError(f"generator_sigma must be a finite float > 0, got {generator_sigma!r}")
        if parameterization == "edm":
            if scheduler is not None:
                raise ValueError(
                    "parameterization='edm' takes no scheduler (EDM scalings need none); pass "
                    "scheduler=None or use parameterization='eps'"
                )
            if prediction_type is not None:
                raise ValueError("prediction_type is for parameterization='eps' only")
            if sigma_data is None or sigma_min is None or sigma_max is None:
                raise ValueError(
                    "parameterization='edm' needs sigma_data, sigma_min and sigma_max, got "
                    f"{sigma_data}, {sigma_min}, {sigma_max}"
                )
        else:
            if scheduler is None:
                raise ValueError(
                    "parameterization='eps' needs the DDPM scheduler whose alphas_cumprod define "
                    "the noise levels"
                )
            if not isinstance(scheduler, SchedulerMixin):
                raise ValueError(
                    f"scheduler must be a diffusers scheduler (SchedulerMixin, saveable), got "
                    f"{type(scheduler).__name__}"
                )
            if (sigma_data, sigma_min, sigma_max) != (None, None, None):
                raise ValueError(
                    "sigma_data, sigma_min and sigma_max are for parameterization='edm'; an 'eps' "
                    "generator reads its noise levels from the scheduler (pass None)"
                )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            parameterization=parameterization,
            generator_sigma=float(generator_sigma),
            sigma_data=None if sigma_data is None else float(sigma_data),
            sigma_min=None if sigma_min is None else float(sigma_min),
            sigma_max=None if sigma_max is None else float(sigma_max),
            prediction_type=prediction_type,
            num_classes=None if num_classes is None else int(num_classes),
        )
        # Validate now (UNet config, sigma range, classes) rather than at the first call.
        denoiser = self.denoiser
        if denoiser.num_classes != self.config.num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the UNet has num_class_embeds="
                f"{denoiser.num_classes}"
            )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> OneStepPipeline:
        """``DiffusionPipeline.from_pretrained`` on a folder written by :meth:`save_pretrained`.

        The same loader, with ``low_cpu_mem_usage=False`` by default when ``accelerate`` is not
        installed (diffusers would fall back to it anyway, after a warning).
        """
        if importlib.util.find_spec("accelerate") is None:
            kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def denoiser(self) -> Denoiser:
        """The denoiser ``D`` built from the current components and config (eval mode)."""
        config = self.config
        if config.parameterization == "edm":
            denoiser: Denoiser = EDMPrecond(
                self.unet,
                sigma_data=config.sigma_data,
                sigma_min=config.sigma_min,
                sigma_max=config.sigma_max,
            )
        else:
            denoiser = DiffusersEpsDenoiser(
                self.unet, self.scheduler, prediction_type=config.prediction_type
            )
        return denoiser.eval()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the generated images (the UNet's channels and sample size)."""
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else (int(s) for s in size)
        return (int(config.in_channels), int(height), int(width))

    def _check_labels(self, class_labels: Any, batch_size: int) -> Tensor | None:
        num_classes = self.config.num_classes
        if class_labels is None:
            return None
        if num_classes is None:
            raise ValueError("class_labels were given but the generator is unconditional")
        labels = torch.as_tensor(class_labels)
        if (
            labels.ndim != 1
            or labels.shape[0] != batch_size
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.dtype == torch.bool
        ):
            raise ValueError(
                f"class_labels must be {batch_size} integers (batch_size), a (batch_size,) "
                f"integer tensor or list, got shape {tuple(labels.shape)}, dtype {labels.dtype}"
            )
        if labels.numel() and not bool(((labels >= 0) & (labels < num_classes)).all()):
            raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        class_labels: Tensor | list[int] | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Draw ``batch_size`` images in one denoiser evaluation.

        The draws follow ``OneStepDistillation.sample``: z first, from ``generator`` on the
        generator's device (the pipeline's device when None, the global RNG), then, for a
        class-conditional generator without ``class_labels``, uniform labels from the same
        generator; so the same seed gives the module's samples.

        Args:
            batch_size: number of images (>= 1).
            generator: a single ``torch.Generator`` (a list is refused: one z tensor is drawn).
            class_labels: ``(batch_size,)`` classes of a conditional generator (uniform if
                None); refused by an unconditional one.
            output_type: "pt": the raw ``(B, C, H, W)`` float tensor of the denoiser, NOT
                clamped, about [-1, 1]; "np": ``(B, H, W, C)`` float32 numpy in [0, 1]
                (``clamp(x / 2 + 0.5, 0, 1)``); "pil": a list of PIL images from the "np" array.
            return_dict: return an ``ImagePipelineOutput``; else the tuple ``(images,)``.

        Raises:
            ValueError: for a bad ``batch_size``, ``generator``, ``class_labels`` or
                ``output_type``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                "generator must be a single torch.Generator or None, got "
                f"{type(generator).__name__}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        labels = self._check_labels(class_labels, batch_size)
        denoiser = self.denoiser
        device = self.unet.device
        draw_device = generator.device if generator is not None else device
        z = torch.randn((batch_size, *self.image_shape), generator=generator, device=draw_device)
        z = z.to(device)
        if self.config.num_classes is not None:
            if labels is None:
                labels = torch.randint(
                    0, self.config.num_classes, (batch_size,), generator=generator,
                    device=draw_device,
                )  # fmt: skip
            labels = labels.to(device)
        sigma = self.config.generator_sigma
        images = denoiser(sigma * z, sigma, labels)
        if output_type != "pt":
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def one_step_pipeline_from_denoiser(
    denoiser: nn.Module, generator_sigma: float, copy_weights: bool = False
) -> OneStepPipeline:
    """The :class:`OneStepPipeline` that samples ``denoiser`` in one step at ``generator_sigma``.

    Reads the parameterization and its scalars from the denoiser: ``EDMPrecond`` gives "edm"
    (``sigma_data``, ``sigma_min``, ``sigma_max``), ``DiffusersEpsDenoiser`` gives "eps" (its
    scheduler and ``prediction_type``).

    Args:
        denoiser: an ``EDMPrecond`` or ``DiffusersEpsDenoiser`` around a diffusers
            ``UNet2DModel`` (a ``torch.compile``-d UNet is unwrapped).
        generator_sigma: :math:`\\sigma_g` of the one step.
        copy_weights: deep-copy the UNet (and scheduler) so the pipeline does not share them with
            ``denoiser``; by default it shares them (enough to ``save_pretrained`` at once).

    Raises:
        ValueError: for any other denoiser or UNet type.
    """
    if isinstance(denoiser, EDMPrecond):
        parameterization = "edm"
        scheduler = None
        scalars: dict[str, Any] = {
            "sigma_data": denoiser.sigma_data,
            "sigma_min": denoiser.sigma_min,
            "sigma_max": denoiser.sigma_max,
        }
    elif isinstance(denoiser, DiffusersEpsDenoiser):
        parameterization = "eps"
        scheduler = denoiser.scheduler
        scalars = {
            "sigma_data": None,
            "sigma_min": None,
            "sigma_max": None,
            "prediction_type": denoiser.prediction_type,
        }
        if not isinstance(scheduler, SchedulerMixin):
            raise ValueError(
                "a DiffusersEpsDenoiser generator exports only with a diffusers scheduler "
                f"(SchedulerMixin, saveable), got {type(scheduler).__name__}"
            )
    else:
        raise ValueError(
            "one-step export needs an EDMPrecond or a DiffusersEpsDenoiser around a diffusers "
            f"UNet2DModel, got {type(denoiser).__name__}; export its weights with state_dict() "
            "instead"
        )
    unet = _unwrap(denoiser.unet)
    if not isinstance(unet, UNet2DModel):
        raise ValueError(
            f"one-step export needs a diffusers UNet2DModel inside the {type(denoiser).__name__}, "
            f"got {type(unet).__name__}"
        )
    if copy_weights:
        unet = copy.deepcopy(unet)
        scheduler = copy.deepcopy(scheduler)
    return OneStepPipeline(
        unet=unet,
        scheduler=scheduler,
        parameterization=parameterization,
        generator_sigma=float(generator_sigma),
        num_classes=denoiser.num_classes,
        **scalars,
    )
