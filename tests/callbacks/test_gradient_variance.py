"""Gradient variance at fixed weights against an explicit estimate, and the a + b / B fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_losses.callbacks.gradient_variance import fit_variance_floor, gradient_variance


def test_variance_is_the_unbiased_trace_of_the_gradient_covariance() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    data = [torch.randn(4, 3, dtype=torch.float64) for _ in range(6)]

    def loss_fn(k: int) -> dict[str, torch.Tensor]:
        out = model(data[k]).square().mean()
        return {"base": out, "double": 2 * out}

    got = gradient_variance(loss_fn, model.parameters(), num_batches=6)
    grads = []
    for x in data:
        w = model.weight.detach()
        grads.append((2 * (x @ w.T) * x).mean(0))  # d/dw mean((x w)^2)
    stacked = torch.stack(grads)
    expected = ((stacked - stacked.mean(0)) ** 2).sum() / 5
    assert got["base"] == pytest.approx(expected.item(), rel=1e-10)
    assert got["double"] == pytest.approx(4 * expected.item(), rel=1e-10)
    assert model.weight.grad is None  # nothing is accumulated or stepped


def test_iid_mean_losses_have_no_floor_and_a_shared_noise_term_does() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    sizes, plain, floored = (4, 16, 64), [], []
    for size in sizes:
        gen = torch.Generator().manual_seed(size)

        def loss_fn(
            k: int, size: int = size, gen: torch.Generator = gen
        ) -> dict[str, torch.Tensor]:
            per_sample = torch.randn(size, 5, generator=gen, dtype=torch.float64)
            shared = torch.randn(5, generator=gen, dtype=torch.float64)
            iid = (per_sample @ weight).mean() + per_sample.mean(0) @ weight
            return {"iid": iid, "shared": iid + shared @ weight}

        out = gradient_variance(loss_fn, [weight], num_batches=400)
        plain.append(out["iid"])
        floored.append(out["shared"])
    iid_fit = fit_variance_floor(sizes, plain)
    shared_fit = fit_variance_floor(sizes, floored)
    # per-sample gradient 2 * N(0, I_5): V = 20 / B; the shared draw adds 5.
    assert iid_fit.floor == pytest.approx(0.0, abs=0.3)
    assert iid_fit.slope == pytest.approx(20.0, rel=0.2)
    assert shared_fit.floor == pytest.approx(5.0, rel=0.2)


def test_fit_recovers_exact_points_and_rejects_bad_input() -> None:
    fit = fit_variance_floor([1, 2, 4], [3 + 8 / b for b in (1, 2, 4)])
    assert fit.floor == pytest.approx(3.0) and fit.slope == pytest.approx(8.0)
    assert fit.residual == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="two distinct"):
        fit_variance_floor([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError, match="one length"):
        fit_variance_floor([1, 2], [1.0])
    with pytest.raises(ValueError, match="finite"):
        fit_variance_floor([1, 2], [1.0, float("nan")])
    with pytest.raises(ValueError, match="batch_sizes"):
        fit_variance_floor([0, 2], [1.0, 1.0])
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="num_batches"):
        gradient_variance(lambda k: w.sum(), [w], num_batches=1)
    with pytest.raises(ValueError, match="requires_grad"):
        gradient_variance(lambda k: w.sum(), [torch.ones(2)], num_batches=2)
    with pytest.raises(ValueError, match="non-finite"):
        gradient_variance(lambda k: (w * float("inf")).sum(), [w], num_batches=2)


def _tiny_dmd(el_weight: float = 0.3):
    from lightning_losses.diffusion import EDMPrecond, unet_for_images
    from lightning_losses.modules import DMDDistillation

    torch.manual_seed(0)
    teacher = EDMPrecond(unet_for_images(1, 8, (8, 16))).eval()
    return DMDDistillation(teacher=teacher, fake_updates_per_generator=1, el_weight=el_weight)


def _real(n: int = 24) -> torch.Tensor:
    return torch.tanh(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)))


def test_module_diagnostic_measures_base_and_each_term_and_leaves_training_unchanged() -> None:
    from lightning_losses.callbacks.gradient_variance import generator_gradient_variance

    measured, plain = _tiny_dmd(), _tiny_dmd()
    batch = _real(6)
    for model in (measured, plain):
        model.seed_noise(5)
        for _ in range(2):  # DMD's gradient is 0 until the fake denoiser leaves the teacher
            model.train_step(batch)
    out = generator_gradient_variance(measured, _real(), (4, 8), num_batches=3)
    assert set(out) == {"base", "base+el"} and set(out["base"]) == {4, 8}
    assert all(v > 0 for by_size in out.values() for v in by_size.values())
    assert out["base+el"] != out["base"]
    again = generator_gradient_variance(measured, _real(), (4, 8), num_batches=3)
    assert again == out  # seeded
    assert all(p.grad is None for p in measured.parameters())
    for _ in range(2):
        a, b = measured.train_step(batch), plain.train_step(batch)
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    with pytest.raises(ValueError, match="max\\(batch_sizes\\) = 32"):
        generator_gradient_variance(measured, _real(), (4, 32))


def test_callback_measures_at_the_end_of_fit_and_logs_floors(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lightning_losses.callbacks.gradient_variance import GradientVarianceCallback
    from tests.fakes import quiet_trainer

    callback = GradientVarianceCallback(batch_sizes=(2, 4), num_batches=2, num_real=8)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback], logger=logger)
    trainer.fit(_tiny_dmd(), DataLoader(_real(8), batch_size=4))
    assert len(callback.history) == 1
    record = callback.history[0]
    assert set(record["floors"]) == {"base", "base+el"}
    logged = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert "diag/grad_var_floor_base+el" in logged and "diag/grad_var_base_B4" in logged
    with pytest.raises(ValueError, match="two distinct"):
        GradientVarianceCallback(batch_sizes=(4, 4))
    with pytest.raises(ValueError, match="num_real"):
        GradientVarianceCallback(batch_sizes=(4, 64), num_real=8)
