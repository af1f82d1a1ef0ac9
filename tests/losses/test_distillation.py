"""The DMD2 and Diff-Instruct generator losses and the fake denoiser's EDM-weighted loss,
against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_losses.losses import diff_instruct_loss, dmd_gradient, dmd_loss, fake_denoiser_loss

#: The Diff-Instruct tests' batch: B = 3 (the loss is a sum over pixels divided by B).
DI_SHAPE = (3, 2, 4, 5)


def _batch(shape=(4, 2, 3, 3), seed=0, dtype=torch.float64):
    """``x, denoised_real, denoised_fake``: uniform in [-1, 1), one generator in that order."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(shape, generator=g, dtype=dtype) * 2 - 1 for _ in range(3))


def _g_by_hand(x, real, fake):
    rows = []
    for b in range(x.shape[0]):
        scale = (x[b] - real[b]).abs().mean()
        rows.append((fake[b] - real[b]) / scale)
    return torch.stack(rows)


def test_dmd_loss_gradient_is_g_over_numel():
    x, real, fake = _batch()
    x.requires_grad_()
    out = dmd_loss(x, real, fake)
    loss = out.loss
    loss.backward()
    g = _g_by_hand(x.detach(), real, fake)
    assert torch.allclose(x.grad, g / x.numel(), rtol=1e-12, atol=0)
    # the logged parts: mean |D_fake - D_real| and the mean normaliser, without gradient
    assert float(out.difference) == pytest.approx(float((fake - real).abs().mean()), rel=1e-12)
    scales = [float((x[b] - real[b]).detach().abs().mean()) for b in range(x.shape[0])]
    assert float(out.normalizer) == pytest.approx(sum(scales) / len(scales), rel=1e-12)
    assert not out.difference.requires_grad and not out.normalizer.requires_grad
    assert float(loss.detach()) == pytest.approx(0.5 * float((g**2).mean()), rel=1e-12)
    assert torch.allclose(dmd_gradient(x, real, fake), g)


def test_dmd_loss_gradient_reaches_x_only():
    x, real, fake = _batch()
    for t in (x, real, fake):
        t.requires_grad_()
    dmd_loss(x, real, fake).loss.backward()
    assert x.grad is not None
    assert real.grad is None and fake.grad is None


def test_dmd_loss_nan_normalisation_gives_zero_gradient():
    x, real, fake = _batch()
    real[1] = x[1]  # mean |x - D_real| = 0 for sample 1: g = (fake - real) / 0
    fake[2] = real[2]
    real[2, 0, 0, 0] = x[2, 0, 0, 0] = 0.0
    fake[2, 0, 0, 0] = float("nan")  # a NaN from the fake denoiser
    x.requires_grad_()
    loss = dmd_loss(x, real, fake).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert x.grad[2, 0, 0, 0] == 0
    g = _g_by_hand(x.detach(), real, fake)
    for b in (0, 3):  # the other samples are untouched
        assert torch.allclose(x.grad[b], g[b] / x.numel())


def test_dmd_loss_computes_in_at_least_float32():
    x, real, fake = _batch(dtype=torch.float32)
    xb = x.bfloat16().requires_grad_()
    loss = dmd_loss(xb, real.bfloat16(), fake.bfloat16()).loss
    assert loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dmd_loss(x, real, fake).loss
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, dmd_loss(x, real, fake).loss)


@pytest.mark.parametrize("loss", [dmd_loss, diff_instruct_loss], ids=["dmd", "diff_instruct"])
def test_generator_losses_reject_bad_inputs(loss):
    x, real, fake = _batch()
    with pytest.raises(ValueError, match="denoised_real has shape"):
        loss(x, real[:, :1], fake)
    with pytest.raises(ValueError, match="denoised_fake has shape"):
        loss(x, real, fake[:2])
    with pytest.raises(ValueError, match=r"x must be a batched tensor of shape \(B, ...\)"):
        loss(x[0, 0, 0], real[0, 0, 0], fake[0, 0, 0])
    with pytest.raises(ValueError, match=r"x must be a batched tensor of shape \(B, ...\)"):
        loss(x[0, 0, 0, 0], real, fake)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        loss(x.long(), real, fake)
    with pytest.raises(ValueError, match="at least one sample"):
        loss(x[:0], real[:0], fake[:0])


def _loss_by_hand(x: Tensor, real: Tensor, fake: Tensor) -> float:
    """The reference value, one element at a time in Python floats."""
    total = 0.0
    for b, c, h, w in torch.cartesian_prod(*(torch.arange(n) for n in x.shape)).tolist():
        total += (float(fake[b, c, h, w]) - float(real[b, c, h, w])) * float(x[b, c, h, w])
    return total / x.shape[0]


# ------------------------------------------------------------------------------------------
# diff_instruct_loss


def test_diff_instruct_loss_value_and_gradient_match_the_formula_in_float64():
    x, real, fake = _batch(DI_SHAPE)
    x.requires_grad_()
    out = diff_instruct_loss(x, real, fake)
    loss = out.loss
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert float(out.difference) == pytest.approx(float((fake - real).abs().mean()), rel=1e-12)
    assert float(loss.detach()) == pytest.approx(_loss_by_hand(x.detach(), real, fake), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, (fake - real) / x.shape[0])  # exactly, elementwise


def test_diff_instruct_loss_gradient_reaches_x_only_and_does_not_depend_on_x():
    x, real, fake = _batch(DI_SHAPE)
    for t in (x, real, fake):
        t.requires_grad_()
    diff_instruct_loss(x, real, fake).loss.backward()
    assert real.grad is None and fake.grad is None
    # the gradient is the stop-gradient difference: the same for any other x
    other = (3 * x.detach() + 1).requires_grad_()
    diff_instruct_loss(other, real, fake).loss.backward()
    assert torch.equal(other.grad, x.grad)


def test_diff_instruct_loss_nan_and_inf_differences_contribute_zero():
    x, real, fake = _batch(DI_SHAPE)
    fake[0, 0, 0, 0] = float("nan")
    real[1, 1, 2, 3] = float("inf")
    fake[2, 0, 1, 1] = float("-inf")
    x.requires_grad_()
    loss = diff_instruct_loss(x, real, fake).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 0, 0, 0] = bad[1, 1, 2, 3] = bad[2, 0, 1, 1] = True
    assert (x.grad[bad] == 0).all()
    expected = torch.where(bad, torch.zeros_like(x), (fake - real) / x.shape[0])
    assert torch.equal(x.grad, expected)
    clean = torch.where(bad, torch.zeros_like(x), fake - real)
    assert float(loss.detach()) == pytest.approx(float((clean * x.detach()).sum() / 3), rel=1e-12)


def test_diff_instruct_loss_computes_in_float32_under_bf16_autocast():
    x, real, fake = (t.float() for t in _batch(DI_SHAPE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = diff_instruct_loss(x, real, fake).loss
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, diff_instruct_loss(x, real, fake).loss, rtol=0, atol=0)
    xb = x.bfloat16().requires_grad_()
    loss = diff_instruct_loss(xb, real.bfloat16(), fake.bfloat16()).loss
    assert loss.dtype == torch.float32
    expected = ((fake.bfloat16().float() - real.bfloat16().float()) * xb.float()).sum() / 3
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16


def test_fake_denoiser_loss_matches_formula():
    denoised, x, _ = _batch(shape=(3, 1, 2, 2))
    sigma = torch.tensor([0.01, 0.5, 80.0], dtype=torch.float64)
    sd = 0.5
    expected = (
        sum(((1 / sigma[b] ** 2 + 1 / sd**2) * (denoised[b] - x[b]) ** 2).sum() for b in range(3))
        / denoised.numel()
    )
    assert torch.allclose(fake_denoiser_loss(denoised, x, sigma, sd), expected, rtol=1e-12)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    assert torch.allclose(weight, 1 / sigma**2 + 1 / sd**2)
    # (B, 1, 1, 1) sigma, a scalar sigma and another sigma_data.
    assert torch.allclose(
        fake_denoiser_loss(denoised, x, sigma.view(3, 1, 1, 1), sd), expected, rtol=1e-12
    )
    scalar = ((1 / 2.0**2 + 1 / 1.0**2) * (denoised - x) ** 2).mean()
    assert torch.allclose(fake_denoiser_loss(denoised, x, 2.0, sigma_data=1.0), scalar)
    low = fake_denoiser_loss(denoised.bfloat16(), x.bfloat16(), sigma.float())
    assert low.dtype == torch.float32


def test_fake_denoiser_loss_rejects_bad_inputs():
    denoised, x, _ = _batch(shape=(3, 1, 2, 2))
    with pytest.raises(ValueError, match="x has shape"):
        fake_denoiser_loss(denoised, x[:2], 1.0)
    with pytest.raises(ValueError, match="sigma must be a scalar"):
        fake_denoiser_loss(denoised, x, torch.ones(2))
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        fake_denoiser_loss(denoised, x, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma_data"):
        fake_denoiser_loss(denoised, x, 1.0, sigma_data=0.0)


def test_fake_denoiser_loss_falls_when_training_a_tiny_denoiser():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    sigma = torch.exp(torch.randn(16, generator=g) * 1.2 - 1.2)
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    torch.manual_seed(0)
    denoiser = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)

    def loss_now():
        denoised = denoiser(noisy.flatten(1)).view_as(x)
        return fake_denoiser_loss(denoised, x, sigma)

    first = float(loss_now())
    for _ in range(50):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
    assert float(loss_now()) < 0.5 * first
