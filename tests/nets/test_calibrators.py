"""Calibrator heads: temperature scaling and the correctness-aware per-sample temperature MLP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_losses.losses import calibration_cross_entropy, correctness_aware_loss
from lightning_losses.nets import (
    CorrectnessAwareCalibrator,
    TemperatureCalibrator,
    TemperatureScaling,
    fit_temperature,
)


def top_label_ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Equal-width top-label ECE; bin b holds confidences in (b/B, (b+1)/B], the first also 0."""
    probs = logits.detach().double().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            gap = (conf[mask].mean() - correct[mask].mean()).abs()
            total += float(mask.double().mean() * gap)
    return total


def _logits(seed: int, n: int = 32, c: int = 10, v: int = 3, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    views = logits + torch.randn(v, n, c, generator=g) * scale
    return logits, views


def _randomise(module: torch.nn.Module, seed: int, std: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------------
# Shared interface and argmax preservation


def test_interface_and_output_shapes():
    logits, views = _logits(0)
    for cal, kwargs in [
        (TemperatureScaling(), {}),
        (CorrectnessAwareCalibrator(num_views=3), {"view_logits": views}),
    ]:
        assert isinstance(cal, TemperatureCalibrator)
        out = cal(logits, **kwargs)
        t = cal.temperature(logits, **kwargs)
        assert out.shape == logits.shape and t.shape == (logits.shape[0],)
        torch.testing.assert_close(out, logits / t[:, None])
    assert TemperatureScaling.requires_views is False
    assert CorrectnessAwareCalibrator.requires_views is True


@pytest.mark.parametrize("seed", range(4))
def test_calibrators_never_change_argmax(seed):
    logits, views = _logits(seed, n=256, c=7, v=2)
    labels = torch.randint(0, 7, (256,), generator=torch.Generator().manual_seed(seed))
    ca = CorrectnessAwareCalibrator(num_views=2, top_k=3, hidden=8)
    ts = TemperatureScaling()
    _randomise(ca, seed, std=3.0)
    with torch.no_grad():
        ts.log_temperature.fill_(float(torch.randn(1).item() * 3))
    for cal in (ca, ts):
        assert torch.equal(cal(logits, views).argmax(1), logits.argmax(1))
    # After a few aggressive optimisation steps, with both objectives.
    for cal in (ca, ts):
        for objective in (correctness_aware_loss, calibration_cross_entropy):
            opt = torch.optim.Adam(cal.parameters(), lr=5.0)
            for _ in range(5):
                opt.zero_grad()
                objective(cal(logits, views), labels).loss.backward()
                opt.step()
            out = cal(logits, views)
            assert torch.isfinite(out).all()
            assert torch.equal(out.argmax(1), logits.argmax(1))


# ------------------------------------------------------------------------------------------------
# CorrectnessAwareCalibrator


def test_features_are_views_softmax_at_original_topk():
    logits, views = _logits(1, n=6, c=9, v=3)
    cal = CorrectnessAwareCalibrator(num_views=3, top_k=4)
    feats = cal.features(logits, views)
    assert feats.shape == (6, 12)
    for i in range(6):
        order = sorted(range(9), key=lambda k: -float(logits[i, k]))[:4]  # rank order
        expected = []
        for j in range(3):
            probs = torch.softmax(views[j, i].double(), 0)
            expected += [float(probs[r]) for r in order]
        torch.testing.assert_close(feats[i].double(), torch.tensor(expected, dtype=torch.float64))
    # The original view's own probabilities are not used: changing them at a fixed top-k order
    # (scaling the logits) leaves the features unchanged.
    torch.testing.assert_close(cal.features(logits * 5.0, views), feats)


def test_bounded_temperature_formula():
    t_min, t_max = 0.5, 4.0
    cal = CorrectnessAwareCalibrator(num_views=2, top_k=2, t_min=t_min, t_max=t_max)
    logits, views = _logits(2, n=5, c=4, v=2)
    last = cal.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
    # u = 0 gives exactly T = 1, even for asymmetric bounds.
    torch.testing.assert_close(cal.temperature(logits, views), torch.ones(5))
    lo, hi = math.log(t_min), math.log(t_max)
    b0 = math.log(-lo / (hi - lo)) - math.log1p(lo / (hi - lo))
    for u in (-3.0, 0.7, 2.0):
        with torch.no_grad():
            last.bias.fill_(u)
        expected = math.exp(lo + (hi - lo) / (1 + math.exp(-(u + b0))))
        torch.testing.assert_close(cal.temperature(logits, views), torch.full((5,), expected))


@pytest.mark.parametrize("value", [1e3, -1e3, "random"])
def test_temperature_stays_within_bounds_for_extreme_weights(value):
    cal = CorrectnessAwareCalibrator(num_views=3, t_min=0.1, t_max=10.0)
    if value == "random":
        _randomise(cal, 0, std=1e3)
    else:
        with torch.no_grad():
            for p in cal.parameters():
                p.fill_(value)
    logits, views = _logits(3, n=128)
    t = cal.temperature(logits, views)
    assert torch.isfinite(t).all()
    assert (t >= 0.1).all() and (t <= 10.0).all()
    out = cal(logits, views)
    assert torch.isfinite(out).all() and torch.equal(out.argmax(1), logits.argmax(1))
    if value == 1e3:
        torch.testing.assert_close(t, torch.full_like(t, 10.0))
    # Moderate weights stay strictly inside.
    _randomise(cal, 1, std=0.3)
    t = cal.temperature(logits, views)
    assert (t > 0.1).all() and (t < 10.0).all()


def test_starts_near_one_for_every_seed_with_nonzero_gradient():
    logits, views = _logits(4, n=64)
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        torch.manual_seed(seed)
        cal = CorrectnessAwareCalibrator(num_views=3)
        t = cal.temperature(logits, views)
        assert ((t >= 0.8) & (t <= 1.25)).all(), (seed, t.min(), t.max())
        correctness_aware_loss(cal(logits, views), labels).loss.backward()
        for name, p in cal.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (seed, name)


def test_dtypes():
    logits, views = _logits(5, n=8)
    cal = CorrectnessAwareCalibrator(num_views=3)
    out = cal(logits.bfloat16(), views.bfloat16())
    assert out.dtype == torch.float32
    assert cal(logits.double(), views.double()).dtype == torch.float64
    assert cal.double()(logits, views).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert CorrectnessAwareCalibrator(num_views=3)(logits, views).dtype == torch.float32
        assert TemperatureScaling()(logits).dtype == torch.float32
    assert TemperatureScaling()(logits.half()).dtype == torch.float32


def test_view_validation():
    logits, views = _logits(6, n=8, c=5, v=3)
    cal = CorrectnessAwareCalibrator(num_views=3, top_k=4)
    with pytest.raises(ValueError, match="needs the transformed views' logits"):
        cal(logits)
    with pytest.raises(ValueError, match=r"view_logits must have shape .* \(3, 8, 5\)"):
        cal(logits, views[:2])
    with pytest.raises(ValueError, match="view_logits must have shape"):
        cal(logits, views[:, :4])
    with pytest.raises(ValueError, match="view_logits must have shape"):
        cal(logits, views.permute(1, 0, 2))
    with pytest.raises(ValueError, match="view_logits must be a floating"):
        cal(logits, views.long())
    with pytest.raises(ValueError, match=r"logits must be a tensor of shape \(N, C\)"):
        cal(logits[0], views)
    with pytest.raises(ValueError, match="logits must be a floating"):
        cal(logits.long(), views)
    with pytest.raises(ValueError, match=r"top_k=6 must be <= the number of classes C = 5"):
        CorrectnessAwareCalibrator(num_views=3, top_k=6)(logits, views)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_views": 0}, "num_views"),
        ({"num_views": 2.0}, "num_views"),
        ({"num_views": 2, "top_k": 0}, "top_k"),
        ({"num_views": 2, "hidden": -1}, "hidden"),
        ({"num_views": 2, "t_min": 1.0}, "t_min"),
        ({"num_views": 2, "t_min": 0.0}, "t_min"),
        ({"num_views": 2, "t_max": 0.9}, "t_max"),
        ({"num_views": 2, "t_max": float("inf")}, "t_max"),
        ({"num_views": 2, "init_std": -1.0}, "init_std"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorrectnessAwareCalibrator(**kwargs)


# ------------------------------------------------------------------------------------------------
# TemperatureScaling and fit_temperature


@pytest.mark.parametrize("log_t", [-1e4, -100.0, 0.0, 100.0, 1e4, float("inf"), float("-inf")])
def test_temperature_scaling_stays_positive_for_any_parameter(log_t):
    ts = TemperatureScaling()
    with torch.no_grad():
        ts.log_temperature.fill_(log_t)
    logits, _ = _logits(7)
    t = ts.temperature(logits)
    assert torch.isfinite(t).all() and (t >= 1e-2).all() and (t <= 1e2).all()
    out = ts(logits)
    assert torch.isfinite(out).all() and torch.equal(out.argmax(1), logits.argmax(1))
    out.sum().backward()
    assert torch.isfinite(ts.log_temperature.grad)


def test_temperature_scaling_basics():
    ts = TemperatureScaling(init_temperature=1.5)
    logits, views = _logits(8)
    torch.testing.assert_close(ts(logits), logits / 1.5)
    torch.testing.assert_close(ts(logits, views), ts(logits))  # view_logits ignored
    ts(logits).sum().backward()
    assert ts.log_temperature.grad is not None and ts.log_temperature.grad != 0
    for kwargs in ({"init_temperature": 0.0}, {"init_temperature": -1.0}, {"t_min": 0.0}):
        with pytest.raises(ValueError, match="init_temperature|t_min"):
            TemperatureScaling(**kwargs)
    with pytest.raises(ValueError, match=r"logits must be a tensor of shape \(N, C\)"):
        ts(logits[0])


def _perfectly_calibrated(seed: int, n: int, c: int = 10):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2.0
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, labels


def test_fit_temperature_recovers_planted_temperature():
    z, labels = _perfectly_calibrated(0, 20_000)
    ts = fit_temperature(2.5 * z, labels)
    assert isinstance(ts, TemperatureScaling) and ts.log_temperature.dtype == torch.float32
    t = ts.scalar_temperature().item()
    assert t == pytest.approx(2.5, rel=0.05)
    # It is the NLL minimum: the derivative w.r.t. log T vanishes there.
    log_t = torch.tensor(math.log(t), dtype=torch.float64, requires_grad=True)
    F.cross_entropy(2.5 * z.double() / log_t.exp(), labels).backward()
    assert abs(log_t.grad.item()) < 1e-4
    # Same answer from bf16 logits (the fit runs in float64).
    t16 = fit_temperature((2.5 * z).bfloat16(), labels).scalar_temperature().item()
    assert t16 == pytest.approx(2.5, rel=0.05)


def test_fit_temperature_validation():
    z, labels = _perfectly_calibrated(1, 16)
    with pytest.raises(ValueError, match=r"labels must have one entry per row of logits \(16\)"):
        fit_temperature(z, labels[:8])
    with pytest.raises(ValueError, match="labels must be an integer"):
        fit_temperature(z, labels.float())
    with pytest.raises(ValueError, match="labels must be class indices"):
        fit_temperature(z, labels + 10)
    with pytest.raises(ValueError, match="max_iter"):
        fit_temperature(z, labels, max_iter=0)
    with pytest.raises(ValueError, match=r"logits must be a tensor of shape \(N, C\)"):
        fit_temperature(z[0], labels)


# ------------------------------------------------------------------------------------------------
# Planted over-confident problem: both calibrators lower the ECE on held-out data.


def _overconfident(seed: int, n: int = 2000, c: int = 10, v: int = 3):
    """True logits with per-sample difficulty; the model reports 3x them; views are noisy copies."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * (0.5 + 2.5 * torch.rand(n, 1, generator=g))
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    logits = 3.0 * z
    views = logits + 3.0 * torch.randn(v, n, c, generator=g)
    return logits, views, labels


def test_training_calibrators_lowers_ece():
    logits, views, labels = _overconfident(0)
    test_logits, test_views, test_labels = _overconfident(1)
    before = top_label_ece(test_logits, test_labels)
    assert before > 0.2  # planted over-confidence

    ts = fit_temperature(logits, labels)
    assert ts.scalar_temperature().item() > 2.0
    ts_ece = top_label_ece(ts(test_logits), test_labels)
    assert ts_ece < 0.5 * before

    torch.manual_seed(0)
    ca = CorrectnessAwareCalibrator(num_views=3)
    opt = torch.optim.Adam(ca.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        correctness_aware_loss(ca(logits, views), labels).loss.backward()
        opt.step()
    with torch.no_grad():
        calibrated = ca(test_logits, test_views)
        temps = ca.temperature(test_logits, test_views)
    ca_ece = top_label_ece(calibrated, test_labels)
    assert ca_ece < 0.5 * before
    assert temps.std() > 0.05  # a per-sample temperature, not a constant
    assert torch.equal(calibrated.argmax(1), test_logits.argmax(1))


def test_fit_temperature_refuses_no_samples_and_probabilities():
    with pytest.raises(ValueError, match=r"logits must hold at least one sample"):
        fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    z, labels = _perfectly_calibrated(2, 64)
    with pytest.raises(ValueError, match="allow_probabilities=True"):
        fit_temperature(z.softmax(1), labels)
    t = fit_temperature(z.softmax(1), labels, allow_probabilities=True).scalar_temperature()
    assert torch.isfinite(t)
    # Log-probabilities are valid logits (softmax is shift invariant): same T as the logits.
    t_log = fit_temperature(z.log_softmax(1), labels).scalar_temperature().item()
    assert t_log == pytest.approx(fit_temperature(z, labels).scalar_temperature().item(), rel=1e-4)


@pytest.mark.parametrize(
    ("std", "module_dtype"), [(0.5, torch.float64), (3.0, torch.float64), (0.5, torch.float32)]
)
def test_closed_form_temperature_gradient_equals_autograd(std, module_dtype):
    """_temperature_backward (the fit's gradient without autograd) against autograd through
    temperature_from_features, in float64: dead ReLU units (std 0.5 and 3 leave some), rows
    whose sigmoid saturates at a bound (std 3), and a float32 network on float64 features."""
    logits, views = _logits(11, n=64)
    cal = CorrectnessAwareCalibrator(num_views=3).to(module_dtype)
    _randomise(cal, 5, std=std)
    with torch.no_grad():
        cal.mlp[-1].bias.fill_(2.0 if std > 1 else 0.0)
    features = cal.features(logits.double(), views.double())
    grad_t = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = cal._closed_form_parameters()
    assert params == list(cal.parameters())
    t = cal.temperature_from_features(features)
    expected = torch.autograd.grad((t * grad_t).sum(), params)
    with torch.no_grad():
        parts = cal._temperature_parts(features)
        got = cal._temperature_backward(parts, grad_t)
    assert torch.equal(parts.temperature, t.detach())
    hidden = parts.hidden
    assert (hidden == 0).any() and (hidden > 0).any()  # both sides of the ReLU are exercised
    if std > 1:
        assert ((parts.sigma * (1 - parts.sigma)) < 1e-12).any()  # saturated rows
    tol = {"rtol": 1e-12, "atol": 1e-14} if module_dtype == torch.float64 else {}
    for g, e, p in zip(got, expected, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        torch.testing.assert_close(g, e, **tol)
    # The whole chain in float64: finite differences agree with the closed form.
    if module_dtype == torch.float64 and std < 1:

        def loss_of_params(w1, b1, w2, b2):
            h = F.relu(features @ w1.t() + b1)
            u = (h @ w2.t() + b2).squeeze(1)
            sig = torch.sigmoid(u + cal.offset)
            temp = (cal.log_t_min + cal.log_t_range * sig).exp().clamp(cal.t_min, cal.t_max)
            return (temp * grad_t).sum()

        leaves = [p.detach().clone().requires_grad_() for p in params]
        assert torch.autograd.gradcheck(loss_of_params, leaves)


def test_closed_form_parameters_only_for_the_stock_network():
    cal = CorrectnessAwareCalibrator(num_views=2)
    assert cal._closed_form_parameters() == list(cal.parameters())
    cal.mlp[0].weight.requires_grad_(False)  # a frozen layer: autograd's path
    assert cal._closed_form_parameters() is None

    class Shifted(CorrectnessAwareCalibrator):
        def temperature_from_features(self, features):
            return super().temperature_from_features(features) * 1.5

    assert Shifted(num_views=2)._closed_form_parameters() is None
    other = CorrectnessAwareCalibrator(num_views=2)
    other.mlp = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    assert other._closed_form_parameters() is None
