"""EDM's deterministic Heun sampler for the probability-flow ODE in sigma space.

With a denoiser :math:`D`, the probability-flow ODE of :math:`x = x_0 + \\sigma\\epsilon` is

.. math::

    \\frac{dx}{d\\sigma} = \\frac{x - D(x; \\sigma)}{\\sigma}.

A Heun step from :math:`\\sigma_a` to :math:`\\sigma_b` (Karras et al. 2022, Algorithm 1 with
:math:`S_{churn} = 0`):

.. math::

    d_a = \\frac{x - D(x; \\sigma_a)}{\\sigma_a}, \\quad
    \\tilde x = x + (\\sigma_b - \\sigma_a)\\, d_a, \\quad
    d_b = \\frac{\\tilde x - D(\\tilde x; \\sigma_b)}{\\sigma_b}, \\quad
    x' = x + (\\sigma_b - \\sigma_a)\\, \\tfrac12 (d_a + d_b),

and the Euler step :math:`x' = \\tilde x` when :math:`\\sigma_b = 0`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_losses.diffusion.denoisers import per_sample_sigma, sigma_checks_enabled
from lightning_losses.diffusion.schedules import karras_sigmas

DenoiserFn = Callable[..., Tensor]


def _call(denoiser: DenoiserFn, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
    if class_labels is None:
        return denoiser(x, sigma).to(x.dtype)
    return denoiser(x, sigma, class_labels=class_labels).to(x.dtype)


def heun_step(
    denoiser: DenoiserFn,
    x: Tensor,
    sigma_from: float | Tensor,
    sigma_to: float | Tensor,
    class_labels: Tensor | None = None,
) -> Tensor:
    """One Heun step of ``dx/dsigma = (x - D(x; sigma)) / sigma`` from sigma_from to sigma_to.

    Second order, except where ``sigma_to == 0``: there (per sample) it is the Euler step, which
    evaluates the denoiser once. The noise levels may be floats or per-sample ``(B,)`` tensors
    (as :func:`~lightning_losses.diffusion.denoisers.per_sample_sigma` reads them), so a batch can
    step between different levels, as consistency distillation does. ``sigma_from`` must be > 0.
    The result has ``x``'s dtype. Gradients flow unless the caller disables them.

    For a denoiser that returns a constant :math:`x_0` the step is exact:
    :math:`x' = x_0 + (\\sigma_b / \\sigma_a)(x - x_0)`.
    """
    for name, value in (("sigma_from", sigma_from), ("sigma_to", sigma_to)):
        if not isinstance(value, Tensor) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not isinstance(sigma_from, Tensor) and sigma_from == 0:
        raise ValueError("sigma_from must be > 0 (the ODE divides by sigma)")
    if x.ndim < 1:
        raise ValueError(f"x must be a batched tensor, got a {x.ndim}-d tensor")
    shape = (-1,) + (1,) * (x.ndim - 1)
    s_from = per_sample_sigma(sigma_from, x, x.dtype)
    s_to = per_sample_sigma(sigma_to, x, x.dtype)
    step = (s_to - s_from).view(shape)
    d_from = (x - _call(denoiser, x, s_from, class_labels)) / s_from.view(shape)
    x_euler = x + step * d_from
    if isinstance(sigma_to, Tensor):
        last = s_to == 0
        # the shortcut reads a flag back (a device synchronisation): not inside trusted_sigmas
        if sigma_checks_enabled() and bool(last.all()):
            return x_euler
    elif sigma_to == 0:
        return x_euler
    else:
        last = None
    # Where sigma_to is 0 the second evaluation is discarded; evaluate it at sigma_from instead.
    s_eval = s_to if last is None else torch.where(last, s_from, s_to)
    d_to = (x_euler - _call(denoiser, x_euler, s_eval, class_labels)) / s_eval.view(shape)
    x_heun = x + step * (0.5 * (d_from + d_to))
    if last is None:
        return x_heun
    return torch.where(last.view(shape), x_euler, x_heun)


@torch.no_grad()
def edm_heun_sampler(
    denoiser: DenoiserFn,
    noise: Tensor,
    sigmas: Tensor | None = None,
    num_steps: int = 18,
    class_labels: Tensor | None = None,
) -> Tensor:
    """EDM's deterministic Heun sampler: ``x = noise * sigmas[0]``, then Heun steps down to 0.

    Args:
        denoiser: ``D(x, sigma, class_labels=None)``, e.g. an
            :class:`~lightning_losses.diffusion.denoisers.Denoiser`.
        noise: standard normal noise ``(B, C, H, W)``; the sampler runs in its dtype promoted to
            at least float32 (pass float64 noise for a float64 trajectory).
        sigmas: the descending noise levels to visit, ``sigmas[0]`` the starting level; a final
            0 is appended when the last entry is not 0. By default ``karras_sigmas(num_steps,
            max(0.002, denoiser.sigma_min), min(80, denoiser.sigma_max))`` as in EDM.
        num_steps: the number of noise levels when ``sigmas`` is None (EDM: 18 on CIFAR-10);
            the denoiser is evaluated ``2 * num_steps - 1`` times.
        class_labels: ``(B,)`` integer labels for a class-conditional denoiser.

    Every step is a :func:`heun_step`; the last one, to sigma = 0, is an Euler step. Runs under
    ``torch.no_grad()``.
    """
    if sigmas is None:
        sigma_min = max(0.002, float(getattr(denoiser, "sigma_min", 0.002)))
        sigma_max = min(80.0, float(getattr(denoiser, "sigma_max", 80.0)))
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if sigmas.ndim != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    if sigmas[-1] != 0:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if not bool((sigmas[:-1] > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            "sigmas must be strictly decreasing and positive (a final 0 allowed), got "
            f"{sigmas.tolist()}"
        )
    x = noise.to(torch.promote_types(noise.dtype, torch.float32)) * float(sigmas[0])
    levels = sigmas.tolist()
    for sigma_from, sigma_to in zip(levels[:-1], levels[1:]):
        x = heun_step(denoiser, x, sigma_from, sigma_to, class_labels)
    return x
