"""The EDM denoising loss (Karras et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def edm_loss(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    class_labels: Tensor | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """EDM's weighted denoising score-matching loss on a clean batch ``x`` (scaled to [-1, 1]).

    .. math::

        \\ln\\sigma \\sim \\mathcal{N}(P_{mean}, P_{std}^2), \\quad \\epsilon \\sim
        \\mathcal{N}(0, I), \\quad \\lambda(\\sigma) = \\frac{\\sigma^2 + \\sigma_d^2}
        {(\\sigma\\, \\sigma_d)^2},

        L = \\operatorname{mean}\\Big(\\lambda(\\sigma)\\,
            \\big(D(x + \\sigma\\epsilon; \\sigma) - x\\big)^2\\Big),

    one :math:`\\sigma` per sample, the mean over every element (EDM sums over pixels and
    averages over the batch: this is that value divided by C*H*W). With EDM preconditioning the
    weight makes the effective target of :math:`F_\\theta` unit variance at every noise level.

    Args:
        denoiser: ``D(x, sigma, class_labels=None)`` with ``sigma`` a ``(B,)`` tensor.
        x: the clean batch ``(B, ...)``.
        class_labels: passed to the denoiser when given.
        p_mean, p_std: mean and standard deviation of :math:`\\ln\\sigma`.
        sigma_data: :math:`\\sigma_d` of the weighting.
        generator: an optional ``torch.Generator`` (on ``x``'s device) for sigma and the noise.

    Returns:
        The scalar loss (float32 or wider).
    """
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError("x must be a non-empty batched tensor (B, ...)")
    if not p_std >= 0:
        raise ValueError(f"p_std must be >= 0, got {p_std}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    batch = x.shape[0]
    log_sigma = p_mean + p_std * torch.randn(
        batch, generator=generator, device=x.device, dtype=dtype
    )
    sigma = log_sigma.exp()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    shape = (-1,) + (1,) * (x.ndim - 1)
    noisy = x + sigma.view(shape) * noise
    if class_labels is None:
        denoised = denoiser(noisy, sigma)
    else:
        denoised = denoiser(noisy, sigma, class_labels=class_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight.view(shape) * (denoised.to(dtype) - x) ** 2).mean()
