"""The constant-decay exponential moving average of a network's weights (one implementation)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update"]


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """One EMA step, in place: :math:`\\bar\\theta \\leftarrow \\beta \\bar\\theta + (1 - \\beta)
    \\theta` for every parameter, buffers copied.

    ``average`` must be a copy of ``model`` (same parameter and buffer names); the update is
    computed in ``average``'s dtype. After k steps from :math:`\\bar\\theta_0 = \\theta_0`,
    :math:`\\bar\\theta_k = \\beta^k \\theta_0 + (1 - \\beta) \\sum_{j=1}^{k} \\beta^{k-j}
    \\theta_j`.

    Raises:
        ValueError: when ``decay`` is not in [0, 1] or the two networks' names differ.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    params = dict(average.named_parameters())
    buffers = dict(average.named_buffers())
    for name, param in model.named_parameters():
        if name not in params:
            raise ValueError(f"the average has no parameter {name!r}: it must copy the model")
        params[name].lerp_(param.detach().to(params[name].dtype), 1.0 - decay)
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffers[name].copy_(buffer)
