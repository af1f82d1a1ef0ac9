"""DMD1's regression loss: the distances against explicit float64 formulas, the module, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_losses.losses import RegressionLoss, regression_loss


def test_pseudo_huber_default_matches_the_formula_in_float64() -> None:
    torch.manual_seed(0)
    g = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    c = 0.00054 * math.sqrt(16)
    ref = [math.sqrt(((g[b] - x[b]) ** 2).sum().item() + c * c) - c for b in range(3)]
    out = regression_loss(g, x)
    assert out.loss.item() == pytest.approx(sum(ref) / 3, rel=1e-12)
    assert out.max_distance.item() == pytest.approx(max(ref), rel=1e-12)


def test_l2_is_the_mean_squared_error_and_the_target_gets_no_gradient() -> None:
    g = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    out = regression_loss(g, x, distance="l2")
    assert out.loss.item() == pytest.approx(((g - x) ** 2).mean().item(), rel=1e-12)
    out.loss.backward()
    assert x.grad is None
    torch.testing.assert_close(g.grad, 2 * (g - x).detach() / g.numel())


class _MeanAbs(nn.Module):
    """A stand-in perceptual distance with a parameter, to see it stay frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.scale * (a - b).abs().flatten(1).mean(1)


def test_lpips_distance_uses_the_given_network_frozen() -> None:
    perceptual = _MeanAbs()
    loss = RegressionLoss("lpips", perceptual=perceptual)
    g = torch.randn(4, 1, 8, 8, requires_grad=True)
    x = torch.randn(4, 1, 8, 8)
    out = loss(g, x)
    assert out.loss.item() == pytest.approx(2 * (g - x).abs().mean().item(), rel=1e-6)
    out.loss.backward()
    assert g.grad is not None and perceptual.scale.grad is None
    assert not perceptual.training


def test_module_and_function_agree_with_a_custom_huber_constant() -> None:
    g, x = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    loss = RegressionLoss(huber_c=0.1)
    assert loss(g, x).loss.item() == pytest.approx(regression_loss(g, x, huber_c=0.1).loss.item())
    assert "pseudo_huber" in repr(loss)


def test_bad_arguments_raise_clearly() -> None:
    with pytest.raises(ValueError, match="perceptual"):
        RegressionLoss("lpips")
    with pytest.raises(ValueError, match="perceptual"):
        regression_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), distance="lpips")
    with pytest.raises(ValueError, match="distance"):
        RegressionLoss("l3")
    with pytest.raises(ValueError, match="huber_c"):
        RegressionLoss(huber_c=0.0)
    with pytest.raises(ValueError, match="huber_c"):
        RegressionLoss(huber_c=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        regression_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3))
