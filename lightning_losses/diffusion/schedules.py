"""Noise-level schedules in EDM sigma space."""

from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The Karras et al. (2022) discretisation of ``[sigma_min, sigma_max]``, descending.

    .. math::

        \\sigma_i = \\Big(\\sigma_{max}^{1/\\rho} + \\tfrac{i}{n-1}
            \\big(\\sigma_{min}^{1/\\rho} - \\sigma_{max}^{1/\\rho}\\big)\\Big)^{\\rho},
        \\qquad i = 0, \\dots, n - 1.

    Computed in float64 and returned as ``dtype`` (float64 by default). The first entry is
    exactly ``sigma_max`` and the last exactly ``sigma_min`` (both rounded once to ``dtype``);
    the values strictly decrease. No trailing zero is appended (:func:`edm_heun_sampler` adds it).

    Raises:
        ValueError: for ``n < 2``, ``rho <= 0`` or unless ``0 < sigma_min < sigma_max``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (high + ramp * (low - high)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.to(device=device, dtype=dtype)
