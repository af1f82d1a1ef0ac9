"""Supplementary losses on the distillation base: EL composed as an object equals the el_weight
shorthand, weights (fixed / auto), names, logging; the shared EMA update."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lightning_losses.modules import (
    ConsistencyDistillation,
    DMDDistillation,
    EmbeddingSupplement,
    SupplementaryLoss,
)
from lightning_losses.modules.ema import ema_update
from tests.fakes import tiny_edm_teacher as tiny_teacher


def real_batch(n: int = 6, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(n, 1, 8, 8, generator=g)), torch.arange(n) % 4


class MeanSquare(SupplementaryLoss):
    """A toy term: mean(x^2)."""

    def forward(self, x, real, class_labels=None, real_labels=None, module=None):
        return x.square().mean()


def steps(model: L.LightningModule, count: int) -> list[dict[str, float]]:
    out = []
    for _ in range(count):
        logs = model.train_step(real_batch())
        out.append({k: repr(float(v)) for k, v in logs.items()})  # NaN == NaN as text
    return out


@pytest.mark.parametrize("mode", ["fixed", "auto"])
def test_composed_el_equals_the_el_weight_shorthand(mode):
    """The same numbers, logs and weights whether EL comes from el_weight or the list."""
    runs = []
    for composed in (False, True):
        L.seed_everything(0)
        kwargs = (
            {"supplementary_losses": [EmbeddingSupplement(0.3, mode, seed=0)]}
            if composed
            else {"el_weight": 0.3, "el_weight_mode": mode, "el_seed": 0}
        )
        model = DMDDistillation(teacher=tiny_teacher(), fake_updates_per_generator=1, **kwargs)
        model.seed_noise(0)
        runs.append((model, steps(model, 3)))
    (a, logs_a), (b, logs_b) = runs
    assert logs_a == logs_b
    assert "train/loss_el" in logs_a[0] and "train/grad_norm_ratio_el" in logs_a[0]
    assert ("train/weight_el" in logs_a[0]) == (mode == "auto")
    for p, q in zip(a.generator.parameters(), b.generator.parameters()):
        assert torch.equal(p, q)


def test_terms_add_with_their_weights_and_log_under_their_names():
    L.seed_everything(0)
    model = ConsistencyDistillation(
        teacher=tiny_teacher(),
        supplementary_losses=[MeanSquare(0.5, name="square"), MeanSquare(2.0, "auto", "auto_sq")],
    )
    model.seed_noise(0)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = model.generate(z)
    real, labels = real_batch()
    objective = model.generator_objective(x, real, None, labels, grad_norms=True)
    assert set(objective.terms) == {"square", "auto_sq"}
    weight = objective.logs["train/weight_auto_sq"]
    expected = (
        objective.base + 0.5 * objective.terms["square"] + weight * objective.terms["auto_sq"]
    )
    torch.testing.assert_close(objective.loss, expected)
    # the automatic weight holds the gradient ratio at 2.0; the fixed one is reported
    assert float(objective.logs["train/grad_norm_ratio_auto_sq"]) == pytest.approx(2.0, rel=1e-5)
    (g_sq,) = torch.autograd.grad(objective.terms["square"], x, retain_graph=True)
    ratio = 0.5 * g_sq.norm() / objective.logs["train/grad_norm_base"]
    torch.testing.assert_close(objective.logs["train/grad_norm_ratio_square"], ratio)
    # a term adds nothing to the base: the consistency loss is the same without it
    plain = ConsistencyDistillation(teacher=tiny_teacher())
    plain.seed_noise(0)
    base = plain.generator_objective(None, real, None, labels).base
    torch.testing.assert_close(base, objective.base)


def test_bad_supplementary_losses_are_refused():
    with pytest.raises(ValueError, match="unique names"):
        DMDDistillation(
            teacher=tiny_teacher(), el_weight=0.1, supplementary_losses=[EmbeddingSupplement()]
        )
    with pytest.raises(ValueError, match="SupplementaryLoss"):
        DMDDistillation(teacher=tiny_teacher(), supplementary_losses=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="weight_mode"):
        MeanSquare(1.0, "adaptive", "x")
    with pytest.raises(ValueError, match="weight must be a finite number"):
        MeanSquare(float("nan"), "fixed", "x")
    with pytest.raises(ValueError, match="name"):
        MeanSquare(1.0, "fixed", "not a name")


def test_ema_update_is_the_lerp_and_copies_buffers():
    model = nn.BatchNorm1d(3)
    average = nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        average.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    ema_update(average, model, 0.75)
    torch.testing.assert_close(average.weight, torch.full((3,), 1.25))
    torch.testing.assert_close(average.running_mean, torch.full((3,), 5.0))
    ema_update(average, model, 0.0)
    torch.testing.assert_close(average.weight, model.weight)
    with pytest.raises(ValueError, match="decay"):
        ema_update(average, model, 1.5)
    with pytest.raises(ValueError, match="no parameter"):
        ema_update(nn.Sequential(nn.Linear(3, 3)), model, 0.5)
