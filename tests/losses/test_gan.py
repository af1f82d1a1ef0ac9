"""DMD2's GAN losses against their formulas, in float64, with gradients and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.losses import gan_discriminator_loss, gan_generator_loss


def _softplus(u: float) -> float:
    return math.log1p(math.exp(u))


def test_discriminator_loss_matches_the_formula_in_float64() -> None:
    real = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    fake = torch.tensor([-2.0, 0.25], dtype=torch.float64)
    out = gan_discriminator_loss(real, fake)
    real_ref = sum(_softplus(-r) for r in real.tolist()) / 3
    fake_ref = sum(_softplus(f) for f in fake.tolist()) / 2
    assert out.loss.dtype == torch.float64
    assert out.real_loss.item() == pytest.approx(real_ref, rel=1e-12)
    assert out.fake_loss.item() == pytest.approx(fake_ref, rel=1e-12)
    assert out.loss.item() == pytest.approx(real_ref + fake_ref, rel=1e-12)
    assert out.real_accuracy.item() == pytest.approx(2 / 3)
    assert out.fake_accuracy.item() == pytest.approx(0.5)


def test_generator_loss_matches_the_formula_and_its_gradient() -> None:
    fake = torch.tensor([[-2.0], [0.25], [4.0]], dtype=torch.float64, requires_grad=True)
    out = gan_generator_loss(fake)
    ref = sum(_softplus(-f) for f in fake.detach().flatten().tolist()) / 3
    assert out.loss.item() == pytest.approx(ref, rel=1e-12)
    assert out.fake_logit_mean.item() == pytest.approx(fake.detach().mean().item())
    out.loss.backward()
    # d/du softplus(-u) = -sigmoid(-u), averaged over the batch.
    expected = -torch.sigmoid(-fake.detach()) / 3
    torch.testing.assert_close(fake.grad, expected)
    assert torch.autograd.gradcheck(
        lambda x: gan_generator_loss(x).loss, (fake.detach().clone().requires_grad_(),)
    )


def test_losses_stay_finite_for_large_logits_and_bf16() -> None:
    big = torch.tensor([1e4, -1e4])
    out = gan_discriminator_loss(big, -big)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(1e4 / 2 * 2, rel=1e-6)
    half = torch.randn(8, dtype=torch.bfloat16)
    assert gan_generator_loss(half).loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gan_discriminator_loss(half, half).loss.dtype == torch.float32


def test_discriminator_gradient_reaches_both_logit_sets_only_through_their_terms() -> None:
    real = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(6, dtype=torch.float64, requires_grad=True)
    gan_discriminator_loss(real, fake).loss.backward()
    torch.testing.assert_close(real.grad, -torch.sigmoid(-real.detach()) / 4)
    torch.testing.assert_close(fake.grad, torch.sigmoid(fake.detach()) / 6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(0), "at least one"),
        (torch.zeros(3, 2), r"\(B,\) or \(B, 1\)"),
        (torch.zeros(2, 1, 1), r"\(B,\) or \(B, 1\)"),
        (torch.zeros(3, dtype=torch.long), "floating"),
        ([0.1, 0.2], r"\(B,\) or \(B, 1\)"),
    ],
)
def test_bad_logits_raise_naming_the_argument(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match="fake_logits.*" + message):
        gan_generator_loss(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="real_logits.*" + message):
        gan_discriminator_loss(bad, torch.zeros(2))  # type: ignore[arg-type]
