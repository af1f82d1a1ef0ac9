"""Consistency models (Song et al. 2023) in EDM sigma space, in diffusers' conventions.

A consistency model maps a point :math:`x_\\sigma` of a probability-flow ODE trajectory to the
trajectory's origin. Its boundary-condition parameterisation around a network :math:`F_\\theta`
(the paper's Appendix C, openai's ``consistency_models`` and diffusers'
``CMStochasticIterativeScheduler``) is

.. math::

    f_\\theta(x, \\sigma) = c_{skip}(\\sigma)\\, x + c_{out}(\\sigma)\\,
        F_\\theta\\big(c_{in}(\\sigma)\\, x;\\ c_{noise}(\\sigma)\\big),

    c_{skip} = \\frac{\\sigma_d^2}{(\\sigma - \\sigma_{min})^2 + \\sigma_d^2}, \\quad
    c_{out} = \\frac{(\\sigma - \\sigma_{min})\\, \\sigma_d}{\\sqrt{\\sigma^2 + \\sigma_d^2}},
    \\quad
    c_{in} = \\frac{1}{\\sqrt{\\sigma^2 + \\sigma_d^2}}, \\quad
    c_{noise} = 1000 \\cdot \\tfrac14 \\ln \\sigma,

so :math:`c_{skip}(\\sigma_{min}) = 1` and :math:`c_{out}(\\sigma_{min}) = 0`: the boundary
condition :math:`f_\\theta(x, \\sigma_{min}) = x` holds exactly, whatever the network.
:math:`c_{noise}` is diffusers' ``CMStochasticIterativeScheduler.sigma_to_t`` (without its
``+ 1e-44``), and :math:`c_{in}` its ``scale_model_input``: a :class:`ConsistencyPrecond` and a
``ConsistencyModelPipeline`` around the same UNet compute the same function (up to float
rounding), which is what makes the export of
:class:`~lightning_losses.modules.ConsistencyDistillation` exact.

NOTE the time input differs from :class:`~lightning_losses.diffusion.EDMPrecond`'s
:math:`\\tfrac14 \\ln\\sigma` (1000 times smaller) and from a DDPM UNet's integer timesteps
in [0, 1000): a student that starts from a teacher's UNet weights sees other time values than
the teacher was trained on and relearns its time conditioning (openai's consistency
distillation also starts from its EDM teacher's weights, whose time input was already
:math:`250 \\ln\\sigma`).

Sampling (the paper's Algorithm 1, ``CMStochasticIterativeScheduler.step``): with
:math:`\\sigma_0 > \\sigma_1 > \\dots`, :math:`x = \\sigma_0 z`, then for every level
:math:`\\hat x = \\mathrm{clip}(f(x, \\sigma_i), -1, 1)` and, unless it is the last one,
:math:`x = \\hat x + \\sqrt{\\sigma_{i+1}^2 - \\sigma_{min}^2}\\, \\epsilon_i`
(:func:`consistency_sampler`). One level is one-step sampling :math:`f(\\sigma_{max} z,
\\sigma_{max})`.

diffusers is imported only inside the functions that build or load diffusers objects.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_losses.diffusion.denoisers import Denoiser, UNetPrecond

__all__ = [
    "ConsistencyPrecond",
    "consistency_pipeline",
    "consistency_sampler",
    "consistency_scalings",
    "consistency_timestep",
]


def consistency_timestep(sigma: Tensor) -> Tensor:
    """The UNet's time input :math:`c_{noise} = 1000 \\cdot 0.25 \\ln \\sigma` (elementwise).

    Computed in ``sigma``'s dtype; :class:`ConsistencyPrecond` passes float64 noise levels, as
    diffusers' ``sigma_to_t`` does with numpy, and the UNet's time embedding rounds the result
    to float32. Large values (:math:`|c_{noise}|` up to about 1550) make that rounding matter:
    computing them in float32 instead would move the time embedding by up to ~1e-4.
    """
    return 1000 * 0.25 * sigma.log()


def consistency_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` of the boundary-condition parameterisation (module docstring).

    The same expressions as diffusers' ``get_scalings_for_boundary_condition`` and
    ``scale_model_input``, in ``sigma``'s dtype; at ``sigma == sigma_min`` they are exactly
    ``(1, 0, 1 / sqrt(sigma_min^2 + sigma_data^2))``.
    """
    sd2 = sigma_data**2
    shifted = sigma - sigma_min
    c_skip = sd2 / (shifted**2 + sd2)
    c_out = shifted * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    return c_skip, c_out, c_in


class ConsistencyPrecond(UNetPrecond):
    """The consistency-model parameterisation around a diffusers ``UNet2DModel`` :math:`F`.

    ``forward(x, sigma, class_labels)`` returns :math:`f(x, \\sigma)` of the module docstring,
    not clipped (training needs the gradient everywhere; samplers clip). It is a
    :class:`~lightning_losses.diffusion.Denoiser`, so a one-step generator
    :math:`x = f(\\sigma_{max} z; \\sigma_{max})` and the distillation base class work with it.

    A :class:`~lightning_losses.diffusion.denoisers.UNetPrecond` (dtypes, the sigma check): the
    time input is computed in float64 (:func:`consistency_timestep`). It is meant for
    :math:`\\sigma \\in [\\sigma_{min}, \\sigma_{max}]` (below :math:`\\sigma_{min}`,
    :math:`c_{out} < 0`).

    Args:
        unet: a ``UNet2DModel`` with ``out_channels == in_channels`` and the "positional" time
            embedding (or a module with its call signature and ``config``).
        sigma_data: :math:`\\sigma_d` (0.5 for [-1, 1] images).
        sigma_min: :math:`\\sigma_{min}`, where :math:`f(x, \\sigma_{min}) = x` (0.002).
        sigma_max: the largest noise level, of one-step sampling (80).
    """

    time_dtype = torch.float64

    @classmethod
    def from_teacher(
        cls,
        teacher: Denoiser,
        sigma_data: float | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> ConsistencyPrecond:
        """A student around a deep copy of ``teacher.unet`` (the teacher is left untouched).

        ``sigma_data`` defaults to the teacher's (0.5 when it has none, e.g. a DDPM teacher).

        Raises:
            ValueError: when the teacher has no ``unet`` (build the student yourself).
        """
        unet = getattr(teacher, "unet", None)
        if not isinstance(unet, nn.Module):
            raise ValueError(
                f"the teacher ({type(teacher).__name__}) has no `unet` to copy: build the "
                "student yourself, ConsistencyPrecond(unet, sigma_data, sigma_min, sigma_max)"
            )
        if sigma_data is None:
            sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        student = cls(copy.deepcopy(unet), sigma_data, sigma_min, sigma_max)
        return student.requires_grad_(True).train()

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return consistency_scalings(sigma, self.sigma_data, self.sigma_min)

    def time_input(self, sigma: Tensor) -> Tensor:
        return consistency_timestep(sigma)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ConsistencyPrecond:
        """Load a LOCAL ``ConsistencyModelPipeline`` folder (``unet/`` + ``scheduler/``).

        ``sigma_data``, ``sigma_min`` and ``sigma_max`` come from the scheduler's config. The
        model is returned in eval mode; nothing is downloaded.

        Raises:
            FileNotFoundError: when ``unet/config.json`` or ``scheduler/scheduler_config.json``
                is missing.
        """
        root = Path(path).expanduser()
        unet_dir, scheduler_file = root / "unet", root / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").is_file() or not scheduler_file.is_file():
            raise FileNotFoundError(
                f"{str(root)!r} is not a ConsistencyModelPipeline folder: it needs "
                "unet/config.json and scheduler/scheduler_config.json (local folders only)"
            )
        from lightning_losses.diffusion.loading import load_unet, read_config

        config = read_config(scheduler_file)
        unet = load_unet(unet_dir)
        return cls(
            unet,
            sigma_data=float(config.get("sigma_data", 0.5)),
            sigma_min=float(config.get("sigma_min", 0.002)),
            sigma_max=float(config.get("sigma_max", 80.0)),
        ).eval()


def _check_sigmas(sigmas: Sequence[float] | Tensor, sigma_min: float, sigma_max: float) -> list:
    levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
    if levels.numel() < 1:
        raise ValueError("sigmas must hold at least one noise level")
    decreasing = bool((levels[1:] < levels[:-1]).all())
    # A small slack: levels read back from float32 (e.g. a scheduler's table) round.
    inside = bool(((levels >= sigma_min * (1 - 1e-6)) & (levels <= sigma_max * (1 + 1e-6))).all())
    if not (decreasing and inside):
        raise ValueError(
            f"sigmas must be strictly decreasing and inside [sigma_min, sigma_max] = "
            f"[{sigma_min}, {sigma_max}], got {levels.tolist()}"
        )
    return levels.tolist()


@torch.no_grad()
def consistency_sampler(
    model: nn.Module,
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    class_labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
) -> Tensor:
    """Few-step consistency sampling (Song et al. 2023, Algorithm 1), as diffusers does it.

    :math:`x = \\sigma_0 z`; for each level :math:`\\hat x = f(x, \\sigma_i)` (clipped to
    [-1, 1] with ``clip_denoised``) and, before the next level,
    :math:`x = \\hat x + \\sqrt{\\sigma_{i+1}^2 - \\sigma_{min}^2}\\, \\epsilon_i`. Returns the
    last :math:`\\hat x`. With ``sigmas = (sigma_max,)`` this is one-step sampling.

    The fresh noise :math:`\\epsilon_i` is drawn from ``generator`` (on its device, in
    ``noise``'s dtype) in level order, as ``CMStochasticIterativeScheduler.step`` draws it, so
    ``ConsistencyModelPipeline(..., timesteps / num_inference_steps, generator=g)`` and this
    function with the scheduler's levels and the same ``g`` (``noise`` its first draw) agree.
    (The scheduler also draws, and discards, a noise tensor after its last level.)

    Args:
        model: ``f(x, sigma, class_labels=None)``, e.g. a :class:`ConsistencyPrecond`; its
            ``sigma_min`` (0.002 when it has none) sets the re-noising.
        noise: standard normal ``(B, C, H, W)``.
        sigmas: strictly decreasing levels inside ``[sigma_min, sigma_max]``.
        class_labels: ``(B,)`` integer labels for a class-conditional model.
        generator: the ``torch.Generator`` of the re-noising draws (None: the global RNG).
        clip_denoised: clip every :math:`\\hat x` to [-1, 1] (diffusers' default).
    """
    sigma_min = float(getattr(model, "sigma_min", 0.002))
    sigma_max = float(getattr(model, "sigma_max", math.inf))
    levels = _check_sigmas(sigmas, sigma_min, sigma_max)
    device = generator.device if generator is not None else noise.device
    x = noise * levels[0]
    denoised = x
    for i, sigma in enumerate(levels):
        if class_labels is None:
            denoised = model(x, sigma)
        else:
            denoised = model(x, sigma, class_labels=class_labels)
        if clip_denoised:
            denoised = denoised.clamp(-1, 1)
        if i + 1 < len(levels):
            sigma_next = min(max(levels[i + 1], sigma_min), sigma_max)
            eps = torch.randn(noise.shape, generator=generator, device=device, dtype=noise.dtype)
            scale = math.sqrt(max(sigma_next**2 - sigma_min**2, 0.0))
            x = denoised + scale * eps.to(denoised.device, denoised.dtype)
    return denoised


def consistency_pipeline(
    model: ConsistencyPrecond,
    num_train_timesteps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
    copy_weights: bool = True,
) -> Any:
    """A diffusers ``ConsistencyModelPipeline`` + ``CMStochasticIterativeScheduler`` of ``model``.

    The scheduler gets ``model``'s ``sigma_min``, ``sigma_max``, ``sigma_data``, the Karras
    ``rho``, ``num_train_timesteps`` (the discretisation N the model was distilled with; the
    pipeline's multi-step levels are entries of that table), ``s_noise = 1`` and
    ``clip_denoised``. ``pipeline(batch_size=n, num_inference_steps=1, generator=g,
    output_type="pt").images`` is :math:`(\\mathrm{clip}(f(\\sigma_{max} z, \\sigma_{max})) + 1)
    / 2` with ``z`` the first draw of ``g``; class labels, when not given, come from the GLOBAL
    RNG there (pass ``class_labels`` to reproduce).

    Args:
        model: the consistency model (its ``unet`` must be a diffusers ``UNet2DModel`` with a
            square, int ``sample_size``: the pipeline makes square images).
        num_train_timesteps: N >= 2.
        rho: the Karras schedule's rho.
        clip_denoised: the scheduler's output clipping.
        copy_weights: give the pipeline its own copy of the UNet (False shares it).

    Raises:
        ValueError: for a model that is not a :class:`ConsistencyPrecond` around a
            ``UNet2DModel``, or a non-square ``sample_size``.
    """
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, ConsistencyPrecond):
        raise ValueError(
            f"consistency_pipeline needs a ConsistencyPrecond, got {type(model).__name__}"
        )
    unet = getattr(model.unet, "_orig_mod", model.unet)
    if not isinstance(unet, UNet2DModel):
        raise ValueError(
            f"ConsistencyModelPipeline needs a diffusers UNet2DModel, got {type(unet).__name__}"
        )
    if not isinstance(model.sample_size, int):
        raise ValueError(
            "ConsistencyModelPipeline makes square images from an int sample_size, got "
            f"sample_size={model.sample_size!r}"
        )
    if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=int(num_train_timesteps),
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
        sigma_data=model.sigma_data,
        s_noise=1.0,
        rho=float(rho),
        clip_denoised=bool(clip_denoised),
    )
    if copy_weights:
        unet = copy.deepcopy(unet)
    return ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
