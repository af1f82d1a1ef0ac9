"""fit_calibrator on cached logits: precomputed inputs give the fit of the per-step reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.losses.calibration import (
    correctness_aware_loss,
    correctness_aware_objective,
    tempered_confidence,
)
from lightning_losses.nets import CorrectnessAwareCalibrator, TemperatureScaling
from lightning_losses.nets.calibrator_fit import (
    _FlatAdam,
    _max_and_argmax,
    _top_classes,
    epoch_batches,
    fit_calibrator,
)


def _problem(n=300, c=7, v=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, c, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    u[torch.arange(n), labels] += 2.0
    views = torch.stack([u + 0.7 * torch.randn(n, c, generator=g, dtype=dtype) for _ in range(v)])
    return u, labels, views


def _fit_both(seed, z, labels, views, prepare=None, **options):
    """``[(history, T), (history, T)]`` of the precomputed and the per-step reference fit from
    the same initial weights (``prepare(calibrator)`` before each fit)."""
    out = []
    for precompute in (True, False):
        torch.manual_seed(seed)
        cal = CorrectnessAwareCalibrator(3).to(z.dtype)
        if prepare is not None:
            prepare(cal)
        history = fit_calibrator(cal, z, labels, views, precompute=precompute, **options)
        with torch.no_grad():
            out.append((history, cal.temperature(z, views)))
    return out


def test_tempered_confidence_matches_softmax_and_its_gradient():
    z, _, _ = _problem(n=20, c=5)
    t = (torch.rand(20, dtype=torch.float64) + 0.3).requires_grad_()
    shifted = z - z.max(dim=1, keepdim=True).values
    conf = tempered_confidence(shifted, t)
    ref = torch.softmax(z / t[:, None], dim=1).max(dim=1).values
    torch.testing.assert_close(conf, ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(conf.sum(), t)
    (ref_grad,) = torch.autograd.grad(ref.sum(), t)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda tt: tempered_confidence(shifted, tt), (t,))
    with pytest.raises(ValueError, match="temperature must have the dtype"):
        tempered_confidence(shifted, t.float())
    with pytest.raises(ValueError, match="temperature must have one entry per row"):
        tempered_confidence(shifted, t[:3])


def test_objective_is_the_loss_and_split_weighting():
    z, labels, _ = _problem(n=50, c=4)
    direct = correctness_aware_loss(z, labels).loss
    correct = (z.argmax(1) == labels).double()
    conf = torch.softmax(z, 1).max(1).values
    torch.testing.assert_close(correctness_aware_objective(conf, correct).loss, direct)
    # Split weighting with a = 0.8: an explicit loop.
    num = sum(((0.2 if y else 0.8) * (c - y) ** 2) for c, y in zip(conf.tolist(), correct.tolist()))
    den = sum((0.2 if y else 0.8) for y in correct.tolist())
    got = correctness_aware_loss(z, labels, weighting="split", accuracy=0.8).loss
    assert got.item() == pytest.approx(num / den, rel=1e-12)
    with pytest.raises(ValueError, match="accuracy must be given"):
        correctness_aware_loss(z, labels, weighting="split")
    with pytest.raises(ValueError, match="accuracy must be given"):
        correctness_aware_loss(z, labels, accuracy=0.5)
    with pytest.raises(ValueError, match="accuracy must be a finite number"):
        correctness_aware_loss(z, labels, weighting="split", accuracy=1.5)


def test_features_once_and_chunked_equal_the_per_call_features(monkeypatch):
    z, _, views = _problem(n=40, c=6)
    cal = CorrectnessAwareCalibrator(3).double()
    full = cal.features(z, views)
    monkeypatch.setattr(CorrectnessAwareCalibrator, "FEATURE_CHUNK_ELEMENTS", 7)  # rows of 1
    torch.testing.assert_close(cal.features(z, views), full, rtol=0, atol=0)
    t_views = cal.temperature(z, views)
    t_feats = cal.temperature(z, features=full)
    torch.testing.assert_close(t_feats, t_views, rtol=0, atol=0)
    torch.testing.assert_close(cal(z, features=full), cal(z, views), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"features must have shape \(N, top_k \* num_views\)"):
        cal.temperature(z, features=full[:, :5])


@pytest.mark.parametrize(
    ("objective", "weighting"),
    [("ca", "balanced"), ("ca", "split"), ("ca", "none"), ("ce", "balanced"), ("mse", "balanced")],
)
def test_precomputed_fit_equals_per_step_reference(objective, weighting):
    z, labels, views = _problem()
    options = {"objective": objective, "weighting": weighting, "epochs": 3, "batch_size": 64}
    fits = _fit_both(3, z, labels, views, lr=1e-2, **options)
    for history, _ in fits:
        assert history.steps == 3 * math.ceil(300 / 64)
    temps = [t for _, t in fits]
    torch.testing.assert_close(temps[0], temps[1], rtol=1e-10, atol=1e-12)
    assert (temps[0] - 1).abs().max() > 1e-3  # it learned something


def test_fit_lowers_the_objective_and_temperature_scaling_by_adam():
    z, labels, views = _problem(n=400)
    z3, views3 = 3 * z, 3 * views  # over-confident
    torch.manual_seed(0)
    cal = CorrectnessAwareCalibrator(3).double()
    history = fit_calibrator(cal, z3, labels, views3, objective="ce", epochs=30, lr=1e-2)
    assert history.train_loss[-1] < history.train_loss[0]
    ts = TemperatureScaling(1.0).double()
    fit_calibrator(ts, z3, labels, objective="ce", epochs=200, batch_size=400, lr=5e-2)
    lbfgs = TemperatureScaling(1.0).double().fit(z3, labels)
    assert ts.scalar_temperature().item() == pytest.approx(
        lbfgs.scalar_temperature().item(), rel=2e-2
    )


def test_holdout_keeps_the_best_epoch_and_patience_stops():
    z, labels, views = _problem(n=200)
    torch.manual_seed(0)
    cal = CorrectnessAwareCalibrator(3).double()
    history = fit_calibrator(
        cal, z, labels, views, epochs=40, lr=0.3, batch_size=32, holdout_fraction=0.25, patience=2
    )
    assert len(history.holdout_loss) == history.epochs
    best = min(range(history.epochs), key=lambda i: history.holdout_loss[i])
    assert history.best_epoch == best + 1
    assert history.epochs < 40 or history.best_epoch >= 39
    assert history.epochs - history.best_epoch <= 2


def test_epoch_batches_cover_every_row_once():
    g = torch.Generator().manual_seed(0)
    batches = epoch_batches(10, 4, g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in epoch_batches(10, 4, g, drop_last=True)] == [4, 4]


def test_fit_calibrator_bad_inputs():
    z, labels, views = _problem(n=30)
    cal = CorrectnessAwareCalibrator(3).double()
    with pytest.raises(ValueError, match="at least one sample"):
        fit_calibrator(cal, z[:0], labels[:0], views[:, :0])
    with pytest.raises(ValueError, match="probability vectors"):
        fit_calibrator(cal, z.softmax(1), labels, views)
    fit_calibrator(cal, z.softmax(1), labels, views, epochs=1, allow_probabilities=True)
    with pytest.raises(ValueError, match="patience needs a held-out set"):
        fit_calibrator(cal, z, labels, views, patience=2)
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_calibrator(cal, z, labels, views, objective="nll")
    with pytest.raises(ValueError, match="view_logits must be a tensor of shape"):
        fit_calibrator(cal, z, labels, None)
    with pytest.raises(ValueError, match=r"view_logits must have shape \(V, N, C\)"):
        fit_calibrator(cal, z, labels, views[:, :10])
    bad = views.clone()
    bad[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="view_logits must be finite"):
        fit_calibrator(cal, z, labels, bad)
    bad = z.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="logits must be finite"):
        fit_calibrator(cal, bad, labels, views)
    with pytest.raises(ValueError, match="holdout_fraction"):
        fit_calibrator(cal, z, labels, views, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="holds out 0"):
        fit_calibrator(cal, z, labels, views, holdout_fraction=0.001)
    with pytest.raises(ValueError, match="labels must be class indices"):
        fit_calibrator(cal, z, labels + 7, views)
    with pytest.raises(ValueError, match="lr must be"):
        fit_calibrator(cal, z, labels, views, lr=float("nan"))
    with pytest.raises(ValueError, match="calibrator must be a TemperatureCalibrator"):
        fit_calibrator(torch.nn.Linear(2, 2), z, labels, views)


def test_temperature_scaling_fit_checks_like_fit_temperature():
    z, labels, _ = _problem(n=50)
    ts = TemperatureScaling()
    with pytest.raises(ValueError, match="probability vectors"):
        ts.fit(z.softmax(1), labels)
    with pytest.raises(ValueError, match="at least one sample"):
        ts.fit(z[:0], labels[:0])
    with pytest.raises(ValueError, match="logits must be finite"):
        ts.fit(torch.full_like(z, float("nan")), labels)
    assert ts.fit(3 * z, labels) is ts
    assert ts.scalar_temperature().item() > 1.5
    cal = CorrectnessAwareCalibrator(3)
    with pytest.raises(ValueError, match="probability vectors"):
        cal.fit(z.softmax(1).float(), labels, torch.rand(3, 50, 7))


def test_holdout_selection_by_nll():
    z, labels, views = _problem(n=200)
    torch.manual_seed(0)
    cal = CorrectnessAwareCalibrator(3).double()
    history = fit_calibrator(
        cal,
        3 * z,
        labels,
        3 * views,
        epochs=15,
        lr=0.05,
        batch_size=32,
        holdout_fraction=0.25,
        selection="nll",
    )
    assert history.best_epoch == 1 + min(range(15), key=lambda i: history.holdout_loss[i])
    # The held-out values are NLLs: positive, and not the CA loss (which is below 1).
    assert all(v > 0 for v in history.holdout_loss)
    with pytest.raises(ValueError, match="selection must be one of"):
        fit_calibrator(cal, z, labels, views, selection="ece")


def test_tempered_confidence_refuses_unshifted_logits_and_bad_temperatures():
    z, _, _ = _problem(n=10, c=4)
    shifted = z - z.max(dim=1, keepdim=True).values
    with pytest.raises(ValueError, match="every row's maximum exactly 0"):
        tempered_confidence(z + 1.0, torch.ones(10, dtype=torch.float64))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        t = torch.ones(10, dtype=torch.float64)
        t[3] = bad
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            tempered_confidence(shifted, t)


class _Overridden(CorrectnessAwareCalibrator):
    """The stock calibrator with an overridden forward (the same math): the fit cannot use the
    closed-form gradient and must take autograd's precomputed path."""

    def temperature_from_features(self, features):
        return super().temperature_from_features(features)


@pytest.mark.parametrize(("weighting", "drop_last"), [("balanced", False), ("split", True)])
def test_closed_form_autograd_and_reference_fits_agree(monkeypatch, weighting, drop_last):
    """Three ways to the same fit in float64: the closed-form step (no autograd), autograd on
    the precomputed inputs, and the per-step reference; the closed form is really taken for the
    stock calibrator and only for it."""
    z, labels, views = _problem(n=250)
    calls = []
    original = CorrectnessAwareCalibrator._temperature_backward

    def counting(self, parts, grad):
        calls.append(type(self))
        return original(self, parts, grad)

    monkeypatch.setattr(CorrectnessAwareCalibrator, "_temperature_backward", counting)
    temps, losses = [], []
    for cls, precompute in (
        (CorrectnessAwareCalibrator, True),
        (_Overridden, True),
        (CorrectnessAwareCalibrator, False),
    ):
        torch.manual_seed(5)
        cal = cls(3).double()
        history = fit_calibrator(
            cal,
            z,
            labels,
            views,
            weighting=weighting,
            epochs=4,
            batch_size=48,
            lr=2e-2,
            drop_last=drop_last,
            holdout_fraction=0.2,
            precompute=precompute,
        )
        with torch.no_grad():
            temps.append(cal.temperature(z, views))
        losses.append(history.train_loss + history.holdout_loss)
    assert calls and set(calls) == {CorrectnessAwareCalibrator}
    assert len(calls) == 4 * (200 // 48 if drop_last else math.ceil(200 / 48))
    for other in (1, 2):
        torch.testing.assert_close(temps[0], temps[other], rtol=1e-10, atol=1e-12)
        assert losses[0] == pytest.approx(losses[other], rel=1e-10)
    assert (temps[0] - 1).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_adam_takes_torch_adams_steps(dtype):
    """The closed-form fit's Adam: the updates of ``torch.optim.Adam`` (single-tensor), step
    for step, with the parameters as views of one vector until ``release``."""
    torch.manual_seed(0)
    ours = CorrectnessAwareCalibrator(3).to(dtype)
    theirs = CorrectnessAwareCalibrator(3).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    params, reference = list(ours.parameters()), list(theirs.parameters())
    adam = _FlatAdam(params, lr=3e-2)
    torch_adam = torch.optim.Adam(reference, lr=3e-2, foreach=False)
    assert all(p.untyped_storage().data_ptr() == adam.flat.data_ptr() for p in params)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) * 10.0**-step for p in params]
        adam.step(grads)
        for p, grad in zip(reference, grads):
            p.grad = grad.clone()
        torch_adam.step()
        for a, b in zip(params, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    adam.release()
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == len(params) and adam.flat.data_ptr() not in storages
    for a, b in zip(params, reference):
        assert torch.equal(a, b)
    assert _FlatAdam.supports(params)
    assert not _FlatAdam.supports([params[0], params[1].detach().half().requires_grad_()])


def test_one_topk_gives_the_row_max_argmax_and_the_features_even_with_ties():
    z, _, views = _problem(n=200, c=6)
    z = z.float()
    z[:40] = z[:40].round()  # integer logits: ties at the top, in either order of the indices
    z[40:50] = 0.0  # all classes tied
    z[50:60, 2:4] = 9.0  # the maximum twice, not first
    cal = CorrectnessAwareCalibrator(3, top_k=4)
    top = _top_classes(z, cal)
    assert top is not None and top.indices.shape == (200, 4)
    row_max, predicted = _max_and_argmax(z, top)
    assert torch.equal(row_max, z.amax(dim=1)) and torch.equal(predicted, z.argmax(dim=1))
    assert (top.values[:, 0] == top.values[:, 1]).sum() >= 20  # the tie branch was taken
    views = views.float()
    torch.testing.assert_close(cal.features(z, views, top.indices), cal.features(z, views))
    assert _top_classes(z, CorrectnessAwareCalibrator(3, top_k=1)) is None  # no tie test at k = 1
    row_max, predicted = _max_and_argmax(z, None)
    assert torch.equal(predicted, z.argmax(dim=1))
    for bad in (top.indices[:, :3], top.indices.int(), top.indices[:-1]):
        with pytest.raises(ValueError, match=r"top must be the \(N, top_k\) = \(200, 4\) int64"):
            cal.features(z, views, bad)


def test_fit_with_a_frozen_layer_uses_autograd_and_keeps_it():
    z, labels, views = _problem(n=120)
    frozen = []

    def freeze(cal):
        cal.mlp[0].requires_grad_(False)
        frozen.append((cal, cal.mlp[0].weight.detach().clone()))

    fits = _fit_both(1, z, labels, views, prepare=freeze, epochs=3, batch_size=40, lr=5e-2)
    for cal, weight in frozen:
        assert torch.equal(cal.mlp[0].weight, weight)
    torch.testing.assert_close(fits[0][1], fits[1][1], rtol=1e-10, atol=1e-12)
    assert (fits[0][1] - 1).abs().max() > 1e-4


def test_float32_closed_form_fit_is_as_close_to_float64_as_the_reference():
    """In float32 the closed form and the per-step reference round differently; both stay
    within a few float32 ulps of T (about 1.2e-7 relative) of the same fit in float64, where
    the two agree to 1e-12 (here 3e-8 to 5e-8 for the closed form, 5e-8 to 1.1e-7 for the
    reference over three seeds)."""
    z, labels, views = _problem(n=400, c=50, dtype=torch.float32)
    temps = {}
    for name, dtype, precompute in (
        ("fast32", torch.float32, True),
        ("ref32", torch.float32, False),
        ("fast64", torch.float64, True),
        ("ref64", torch.float64, False),
    ):
        torch.manual_seed(2)
        cal = CorrectnessAwareCalibrator(3).to(dtype)
        zz, vv = z.to(dtype), views.to(dtype)
        fit_calibrator(
            cal, zz, labels, vv, epochs=10, batch_size=100, lr=1e-2, precompute=precompute
        )
        with torch.no_grad():
            temps[name] = cal.temperature(z.double(), views.double())
    truth = temps["fast64"]
    torch.testing.assert_close(temps["ref64"], truth, rtol=1e-12, atol=1e-12)
    for name in ("fast32", "ref32"):
        assert (temps[name] - truth).abs().max().item() < 4e-7, name
    assert (truth - 1).abs().max() > 0.2  # it learned something


def test_closed_form_fit_cut_by_max_steps_reports_the_steps_taken():
    z, labels, views = _problem(n=200)
    fits = _fit_both(4, z, labels, views, epochs=5, batch_size=48, lr=2e-2, max_steps=7)
    for history, _ in fits:
        assert (history.steps, history.epochs) == (7, 2)
    assert fits[0][0].train_loss == pytest.approx(fits[1][0].train_loss, rel=1e-10)
    torch.testing.assert_close(fits[0][1], fits[1][1], rtol=1e-10, atol=1e-12)
