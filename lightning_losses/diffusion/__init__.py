"""Diffusion teachers and denoisers in EDM sigma space.

A denoiser is an ``nn.Module`` called as ``D(x, sigma, class_labels=None)`` that estimates the
clean image ``x0`` (scaled to [-1, 1]) from ``x = x0 + sigma * eps``
(:class:`~lightning_losses.diffusion.denoisers.Denoiser`). This package provides the EDM
preconditioning around a diffusers ``UNet2DModel`` (:class:`EDMPrecond`), a wrapper for diffusers
DDPM teachers (:class:`DiffusersEpsDenoiser`), the Karras noise schedule, EDM's Heun sampler, the
EDM training loss and a small UNet factory; ``OneStepPipeline`` and
``one_step_pipeline_from_denoiser`` (a distilled one-step generator as a diffusers pipeline) are
imported from :mod:`lightning_losses.diffusion.pipelines` when first asked for.

Importing it imports neither Lightning nor diffusers: diffusers is imported inside the functions
that build or load models.
"""

from lightning_losses.diffusion.batches import RealBatch, split_real_batch
from lightning_losses.diffusion.consistency import (
    ConsistencyPrecond,
    consistency_pipeline,
    consistency_sampler,
    consistency_scalings,
    consistency_timestep,
)
from lightning_losses.diffusion.denoisers import (
    PREDICTION_TYPES,
    Denoiser,
    DiffusersEpsDenoiser,
    EDMPrecond,
    UNetPrecond,
    per_sample_sigma,
    trusted_sigmas,
)
from lightning_losses.diffusion.loading import load_denoiser
from lightning_losses.diffusion.samplers import edm_heun_sampler, heun_step
from lightning_losses.diffusion.schedules import karras_sigmas
from lightning_losses.diffusion.teacher_pairs import (
    TeacherPairs,
    load_teacher_pairs,
    make_teacher_pairs,
    save_teacher_pairs,
)
from lightning_losses.diffusion.training import edm_loss
from lightning_losses.diffusion.unets import unet_for_images

__all__ = [
    "TeacherPairs",
    "load_teacher_pairs",
    "make_teacher_pairs",
    "save_teacher_pairs",
    "PREDICTION_TYPES",
    "ConsistencyPrecond",
    "consistency_pipeline",
    "consistency_sampler",
    "consistency_scalings",
    "consistency_timestep",
    "Denoiser",
    "DiffusersEpsDenoiser",
    "EDMPrecond",
    "RealBatch",
    "UNetPrecond",
    "edm_heun_sampler",
    "edm_loss",
    "heun_step",
    "karras_sigmas",
    "load_denoiser",
    "per_sample_sigma",
    "split_real_batch",
    "trusted_sigmas",
    "unet_for_images",
]

# diffusers is the base of OneStepPipeline: import pipelines.py only when a name is asked for.
_LAZY = ("OneStepPipeline", "one_step_pipeline_from_denoiser")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from lightning_losses.diffusion import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
