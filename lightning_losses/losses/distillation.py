"""Distribution Matching Distillation (DMD / DMD2) losses, in EDM sigma space.

Notation (EDM sigma space): a one-step generator gives images x; a noisy
copy :math:`x_t = x + \\sigma \\epsilon` is denoised by the frozen teacher ("real" denoiser,
:math:`D_{real}`) and by a "fake" denoiser :math:`D_{fake}` trained on generator samples.

Generator loss (DMD2, Yin et al. 2024; ``main/edm`` of github.com/tianweiy/DMD2). Per sample b,

.. math::

    g_b = \\frac{D_{fake}(x_t)_b - D_{real}(x_t)_b}{\\operatorname{mean}_{c,h,w}
        \\lvert x_b - D_{real}(x_t)_b \\rvert}, \\qquad
    L_{DMD} = \\tfrac12 \\operatorname{mean}\\big((x - \\mathrm{sg}(x - g))^2\\big),

with g computed without gradient and NaN / inf entries of g set to 0 (DMD2 uses
``torch.nan_to_num``, which maps inf to the dtype's largest value; we map it to 0). The loss
value is :math:`\\tfrac12 \\operatorname{mean}(g^2)` and :math:`\\partial L / \\partial x = g / N`,
N the number of elements of x: a gradient step on x moves it along
:math:`D_{real} - D_{fake}`, towards the data.

Fake denoiser loss: the EDM-weighted denoising loss on DETACHED generator samples x,

.. math::

    L_{fake} = \\operatorname{mean}\\Big(\\lambda(\\sigma) \\big(D_{fake}(x + \\sigma\\epsilon;
        \\sigma) - x\\big)^2\\Big), \\qquad
    \\lambda(\\sigma) = \\frac{1}{\\sigma^2} + \\frac{1}{\\sigma_{data}^2}
        = \\frac{\\sigma^2 + \\sigma_{data}^2}{(\\sigma\\, \\sigma_{data})^2}.

Diff-Instruct's generator loss (Luo et al. 2023; ``training/di_loss.py`` of
github.com/pkulwj1994/diff_instruct) uses the same two denoisers without DMD's normalisation
(:func:`diff_instruct_loss`, where its formula is).

All compute in at least float32 with autocast disabled (bf16 / fp16 inputs are upcast; float64
stays float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_losses.checks import all_true, describe, working_dtype

__all__ = [
    "DMDLossOutput",
    "DiffInstructLossOutput",
    "diff_instruct_loss",
    "dmd_gradient",
    "dmd_loss",
    "edm_loss_weight",
    "fake_denoiser_loss",
]


class DMDLossOutput(NamedTuple):
    """:func:`dmd_loss`: the loss and its parts (detached).

    Attributes:
        loss: ``0.5 * mean(g^2)``, with gradient ``g / N`` to x.
        difference: ``mean |D_fake - D_real|`` over every element.
        normalizer: the batch mean of the per-sample ``mean_{c,h,w} |x - D_real|``.
    """

    loss: Tensor
    difference: Tensor
    normalizer: Tensor


class DiffInstructLossOutput(NamedTuple):
    """:func:`diff_instruct_loss`: the loss and ``difference = mean |D_fake - D_real|``."""

    loss: Tensor
    difference: Tensor


def _check_batch(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.ndim < 2:
        raise ValueError(
            f"{name} must be a batched tensor of shape (B, ...), got {describe(value)}"
        )
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(value.shape)}")


def _check_same_shape(reference: str, x: Tensor, name: str, other: Tensor) -> None:
    _check_batch(name, other)
    if other.shape != x.shape:
        raise ValueError(
            f"{name} has shape {tuple(other.shape)} but {reference} has {tuple(x.shape)}; "
            "they must match"
        )


def dmd_gradient(x: Tensor, denoised_real: Tensor, denoised_fake: Tensor) -> Tensor:
    """The normalised DMD2 direction g (no gradient, NaN / inf -> 0), shaped like x.

    ``g = (denoised_fake - denoised_real) / mean_{c,h,w} |x - denoised_real|`` per sample, in at
    least float32. Inputs as in :func:`dmd_loss` (not checked here).
    """
    dtype = working_dtype(x, denoised_real, denoised_fake)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x, real, fake = (t.detach().to(dtype) for t in (x, denoised_real, denoised_fake))
        dims = tuple(range(1, x.ndim))
        scale = (x - real).abs().mean(dim=dims, keepdim=True)
        g = (fake - real) / scale
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: Tensor, denoised_real: Tensor, denoised_fake: Tensor) -> DMDLossOutput:
    """DMD2's distribution-matching generator loss; see the module docstring for the math.

    Args:
        x: (B, ...) generator samples, with gradient (the only input that gets one).
        denoised_real: the teacher's denoised estimate of the noisy x, same shape.
        denoised_fake: the fake denoiser's estimate of the same noisy x, same shape.

    Returns:
        :class:`DMDLossOutput`; ``loss`` is a 0-d tensor in at least float32, ``0.5 *
        mean(g^2)``, whose gradient with respect to x is ``g / x.numel()``. A sample with
        ``x == denoised_real`` (0 / 0) contributes 0.

    Raises:
        ValueError: for non-float or unbatched inputs, or shapes that differ.
    """
    _check_batch("x", x)
    _check_same_shape("x", x, "denoised_real", denoised_real)
    _check_same_shape("x", x, "denoised_fake", denoised_fake)
    g = dmd_gradient(x, denoised_real, denoised_fake)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(g.dtype)
        target = (xf - g).detach()
        loss = 0.5 * torch.mean((xf - target) ** 2)
        with torch.no_grad():
            real = denoised_real.detach().to(g.dtype)
            difference = (denoised_fake.detach().to(g.dtype) - real).abs().mean()
            normalizer = (xf.detach() - real).abs().mean()
    return DMDLossOutput(loss, difference, normalizer)


def diff_instruct_loss(
    x: Tensor, denoised_real: Tensor, denoised_fake: Tensor
) -> DiffInstructLossOutput:
    """Diff-Instruct's generator loss: ``sum(sg(denoised_fake - denoised_real) * x) / B``.

    With :math:`\\delta = D_{fake}(x_t) - D_{real}(x_t)` (no gradient; NaN / inf entries -> 0,
    as :func:`dmd_loss` does),

    .. math::

        L_{DI} = \\frac{1}{B} \\sum_{b,c,h,w} \\delta_{bchw}\\, x_{bchw}, \\qquad
        \\frac{\\partial L_{DI}}{\\partial x} = \\frac{\\delta}{B}.

    Since the score is :math:`(D - x_t) / \\sigma^2`, :math:`\\delta = \\sigma^2
    (s_{fake} - s_{real})`: a gradient step on x follows :math:`s_{real} - s_{fake}`, the
    Integral-KL direction with weight :math:`\\sigma^2` on the score difference (the
    reference's ``weight = 1.0`` on denoiser differences). The value itself is not a divergence
    (it can be negative); only its gradient matters.

    Args:
        x: (B, ...) generator samples, with gradient (the only input that gets one).
        denoised_real: the teacher's denoised estimate of the noisy x, same shape.
        denoised_fake: the fake denoiser's estimate of the same noisy x, same shape.

    Returns:
        :class:`DiffInstructLossOutput`; ``loss`` is a 0-d tensor in at least float32 (autocast
        disabled). An entry where the difference is NaN / inf contributes 0 to the value and to
        the gradient.

    Raises:
        ValueError: for non-float, unbatched or empty inputs, or shapes that differ.
    """
    _check_batch("x", x)
    _check_same_shape("x", x, "denoised_real", denoised_real)
    _check_same_shape("x", x, "denoised_fake", denoised_fake)
    dtype = working_dtype(x, denoised_real, denoised_fake)
    with torch.autocast(device_type=x.device.type, enabled=False):
        with torch.no_grad():
            delta = denoised_fake.detach().to(dtype) - denoised_real.detach().to(dtype)
            # divided before the product, so that the gradient is exactly delta / B
            delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
            direction = delta / x.shape[0]
        return DiffInstructLossOutput((direction * x.to(dtype)).sum(), delta.abs().mean())


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM's loss weight ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _per_sample_sigma(
    sigma: Tensor | float, x: Tensor, dtype: torch.dtype, check: bool = True
) -> Tensor:
    """``sigma`` as a (B, 1, ..., 1) tensor broadcasting against x; checked > 0 and finite."""
    batch = x.shape[0]
    s = torch.as_tensor(sigma, device=x.device)
    if not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"sigma must be a float or a float tensor, got dtype {s.dtype}")
    s = s.to(dtype)
    if s.ndim == 0:
        s = s.expand(batch)
    elif s.numel() == batch and s.shape[0] == batch and all(d == 1 for d in s.shape[1:]):
        s = s.reshape(batch)
    else:
        raise ValueError(
            f"sigma must be a scalar, shape ({batch},) or ({batch}, 1, ..., 1) for a batch of "
            f"{batch}, got shape {tuple(s.shape)}"
        )
    if check and not all(all_true(torch.isfinite(s).all(), (s > 0).all())):  # one host read
        raise ValueError("sigma must be finite and > 0 for every sample")
    return s.reshape(batch, *([1] * (x.ndim - 1)))


def fake_denoiser_loss(
    denoised: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_data: float = 0.5,
    check_sigma: bool = True,
) -> Tensor:
    """EDM-weighted denoising loss of the fake denoiser; see the module docstring.

    Args:
        denoised: (B, ...) the fake denoiser's output on ``x + sigma * eps``.
        x: (B, ...) the clean targets: DETACHED generator samples (detach them yourself; the
            loss differentiates whatever requires grad).
        sigma: the noise level of each sample: a scalar, (B,) or (B, 1, ..., 1); > 0.
        sigma_data: EDM's data standard deviation (0.5 for data in [-1, 1]), > 0.
        check_sigma: check that every sigma is finite and > 0 (one host read); False for
            levels drawn from a checked table.

    Returns:
        A 0-d tensor in at least float32:
        ``mean((1/sigma^2 + 1/sigma_data^2) * (denoised - x)^2)`` over every element.

    Raises:
        ValueError: for mismatched shapes, a sigma that is not > 0 or does not match the batch,
            or a sigma_data that is not > 0.
    """
    _check_batch("denoised", denoised)
    _check_same_shape("denoised", denoised, "x", x)
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)):
        raise ValueError(f"sigma_data must be a float > 0, got {sigma_data!r}")
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite float > 0, got {sigma_data!r}")
    dtype = working_dtype(denoised, x)
    if isinstance(sigma, Tensor) and sigma.is_floating_point():
        dtype = torch.promote_types(dtype, sigma.dtype)
    with torch.autocast(device_type=denoised.device.type, enabled=False):
        s = _per_sample_sigma(sigma, denoised, dtype, check_sigma)
        weight = edm_loss_weight(s, sigma_data)
        return torch.mean(weight * (denoised.to(dtype) - x.to(dtype)) ** 2)
