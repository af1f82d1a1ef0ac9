"""The generator's gradient noise at fixed weights, and its floor as the batch grows.

For K independent mini-batches of size B drawn at the SAME weights :math:`\\theta`, with
:math:`g_k = \\nabla_\\theta \\mathcal L(\\text{batch}_k)` flattened over the chosen parameters,

.. math::

    V(B) = \\frac{1}{K - 1} \\sum_{k=1}^{K} \\lVert g_k - \\bar g \\rVert_2^2
    \\qquad (\\bar g = \\tfrac1K \\textstyle\\sum_k g_k),

the unbiased estimate of the trace of the gradient's covariance. For a mean over B i.i.d.
per-sample terms :math:`V(B) = b / B`; a loss whose noise does not average out over the batch
(a shared noise draw, a moving target such as DMD's fake denoiser) has a floor,
:math:`V(B) = a + b / B`. :func:`fit_variance_floor` fits ``a`` and ``b`` by least squares in
:math:`1 / B` (the EL paper's claim: EL lowers DMD's floor ``a``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.checks import check_int

__all__ = ["VarianceFloor", "fit_variance_floor", "gradient_variance"]

LossFn = Callable[[int], Mapping[str, Tensor] | Tensor]


def gradient_variance(
    loss_fn: LossFn, parameters: Iterable[nn.Parameter], num_batches: int = 8
) -> dict[str, float]:
    """:math:`V` of each named loss over ``num_batches`` independent draws (module docstring).

    Args:
        loss_fn: ``loss_fn(k)`` draws the k-th independent mini-batch and returns a scalar loss
            or a mapping ``{name: scalar loss}`` (e.g. the base loss and base + EL); it must
            not step any optimizer (the weights stay fixed).
        parameters: the parameters whose gradient is measured (e.g. the generator's).
        num_batches: K >= 2.

    Returns:
        ``{name: V}`` as Python floats (float64 accumulation).

    Raises:
        ValueError: for K < 2, no parameters with ``requires_grad``, or a loss that is not a
            finite scalar.
    """
    check_int(num_batches, "num_batches", minimum=2)
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters must hold at least one tensor with requires_grad=True")
    sums: dict[str, Tensor] = {}
    squares: dict[str, Tensor] = {}
    for k in range(num_batches):
        losses = loss_fn(k)
        if isinstance(losses, Tensor):
            losses = {"loss": losses}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn({k})[{name!r}] must be a scalar tensor")
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).detach().double().flatten()
                    for p, g in zip(params, grads)
                ]
            )
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"loss_fn({k})[{name!r}] has a non-finite gradient")
            sums[name] = sums.get(name, 0) + flat
            squares[name] = squares.get(name, 0) + flat.square().sum()
    # sum_k ||g_k - mean||^2 = sum_k ||g_k||^2 - ||sum_k g_k||^2 / K
    return {
        name: float((squares[name] - sums[name].square().sum() / num_batches) / (num_batches - 1))
        for name in sums
    }


class VarianceFloor(NamedTuple):
    """The fit :math:`V(B) = a + b / B`: ``floor`` is a, ``slope`` b, ``residual`` the RMS error."""

    floor: float
    slope: float
    residual: float


def fit_variance_floor(batch_sizes: Sequence[int], variances: Sequence[float]) -> VarianceFloor:
    """Least-squares :math:`a + b / B` through the points ``(B_i, V_i)`` (at least 2 sizes).

    Raises:
        ValueError: for fewer than two distinct batch sizes, lengths that differ, a batch size
            < 1 or a non-finite variance.
    """
    if len(batch_sizes) != len(variances):
        raise ValueError(
            f"batch_sizes ({len(batch_sizes)}) and variances ({len(variances)}) must have "
            "one length"
        )
    for size in batch_sizes:
        check_int(size, "batch_sizes[i]", minimum=1)
    if len(set(batch_sizes)) < 2:
        raise ValueError(f"batch_sizes must hold at least two distinct sizes, got {batch_sizes}")
    x = torch.tensor([1.0 / b for b in batch_sizes], dtype=torch.float64)
    y = torch.tensor([float(v) for v in variances], dtype=torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"variances must be finite, got {list(variances)}")
    design = torch.stack([torch.ones_like(x), x], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    residual = (design @ solution - y).square().mean().sqrt()
    return VarianceFloor(float(solution[0]), float(solution[1]), float(residual))
