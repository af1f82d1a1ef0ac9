"""DMD1's regression loss: the one-step generator against the teacher's ODE samples.

On pre-computed pairs :math:`(z_n, x_n)`
(:func:`~lightning_losses.diffusion.teacher_pairs.make_teacher_pairs`),

.. math::

    \\mathcal{L}_{reg} = \\frac1B \\sum_{b} d\\big(G(z_b), x_b\\big),

with :math:`d` LPIPS in DMD1 (weight 0.25). LPIPS needs pretrained VGG weights that cannot be
downloaded here, so the default is our choice, the pseudo-Huber distance
:math:`d = \\sqrt{\\lVert G(z) - x \\rVert_2^2 + c^2} - c`, :math:`c = 0.00054 \\sqrt{CHW}`
(consistency models' alternative to LPIPS); ``"l2"`` is the mean squared error; ``"lpips"``
takes a perceptual network built from a local weights file
(:class:`~lightning_losses.nets.lpips.LPIPS`) and fails clearly without one.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from lightning_losses.checks import check_choice, check_float
from lightning_losses.losses.consistency import consistency_distance

__all__ = ["REGRESSION_DISTANCES", "RegressionLoss", "RegressionLossOutput", "regression_loss"]

REGRESSION_DISTANCES: tuple[str, ...] = ("pseudo_huber", "l2", "lpips")
_NO_LPIPS = (
    "distance='lpips' needs perceptual=lightning_losses.nets.LPIPS(<local weights file>); "
    "no weights are downloaded"
)


class RegressionLossOutput(NamedTuple):
    """The regression loss (batch mean of the distances) and their largest value."""

    loss: Tensor
    max_distance: Tensor


def regression_loss(
    generated: Tensor,
    target: Tensor,
    distance: str = "pseudo_huber",
    huber_c: float | None = None,
    perceptual: nn.Module | None = None,
) -> RegressionLossOutput:
    """:math:`\\frac1B \\sum_b d(G(z_b), x_b)` (module docstring); ``target`` is detached.

    Args:
        generated: the generator's images from the pairs' noise, ``(B, C, H, W)``.
        target: the teacher's samples from the same noise, same shape.
        distance: ``"pseudo_huber"`` (default), ``"l2"`` or ``"lpips"``.
        huber_c: the pseudo-Huber constant; None: :math:`0.00054 \\sqrt{CHW}`.
        perceptual: the LPIPS module (``distance="lpips"`` only), returning ``(B,)`` distances.

    Raises:
        ValueError: for tensors of different shapes / non-float, an unknown distance, or
            ``distance="lpips"`` without a ``perceptual`` module.
    """
    check_choice(distance, "distance", REGRESSION_DISTANCES)
    if distance == "lpips":
        if perceptual is None:
            raise ValueError(_NO_LPIPS)
        if generated.shape != target.shape:
            raise ValueError(
                f"target has shape {tuple(target.shape)} but generated has "
                f"{tuple(generated.shape)}; they must match"
            )
        per_sample = perceptual(generated.float(), target.detach().float())
    else:
        name = "l2" if distance == "l2" else "pseudo_huber"
        per_sample = consistency_distance(generated, target, name, huber_c)
    return RegressionLossOutput(per_sample.mean(), per_sample.detach().max())


class RegressionLoss(nn.Module):
    """:func:`regression_loss` as a module: the distance, and the perceptual network for LPIPS.

    Args:
        distance: ``"pseudo_huber"`` (default, ours), ``"l2"`` or ``"lpips"`` (DMD1's).
        huber_c: the pseudo-Huber constant; None: :math:`0.00054 \\sqrt{CHW}`.
        perceptual: the LPIPS network for ``distance="lpips"``, e.g.
            ``lightning_losses.nets.LPIPS("vgg16.safetensors")`` (a local file; nothing is
            downloaded). It is frozen here: the regression loss trains only the generator.

    Raises:
        ValueError: an unknown distance, a ``huber_c`` that is not finite > 0, or
            ``distance="lpips"`` without ``perceptual``.
    """

    def __init__(
        self,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        perceptual: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.distance = check_choice(distance, "distance", REGRESSION_DISTANCES)
        if huber_c is not None:
            huber_c = check_float(huber_c, "huber_c", minimum=0.0, strict_minimum=True)
        self.huber_c = huber_c
        if distance == "lpips" and perceptual is None:
            raise ValueError(_NO_LPIPS)
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False).eval()

    def forward(self, generated: Tensor, target: Tensor) -> RegressionLossOutput:
        return regression_loss(generated, target, self.distance, self.huber_c, self.perceptual)

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, huber_c={self.huber_c}"
