"""Calibration baselines against slow explicit float64 references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression

from lightning_losses.nets.binning import (
    HistogramBinning,
    IsotonicCalibration,
    pool_adjacent_violators,
    top_label_logits,
)
from lightning_losses.nets.scaling import EnsembleTemperatureScaling, MatrixScaling, VectorScaling


def _problem(n=400, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, c, generator=g, dtype=torch.float64)
    u[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 1.5
    labels = torch.multinomial(torch.softmax(u, 1), 1, generator=g).squeeze(1)
    return scale * u, labels


def _nll_loop(probs_fn, z, labels):
    total = 0.0
    for i in range(z.shape[0]):
        total -= math.log(probs_fn(z[i])[int(labels[i])])
    return total / z.shape[0]


# ---------------------------------------------------------------------------------- ETS


def test_ets_weights_minimise_the_nll_over_the_simplex():
    z, labels = _problem()
    ets = EnsembleTemperatureScaling().double().fit(z, labels)
    t = ets.temperature.scalar_temperature().item()
    w = ets.weights().detach().tolist()
    c = z.shape[1]

    def mix(weights):
        def probs(row):
            a = [math.exp(v / t) for v in row.tolist()]
            b = [math.exp(v) for v in row.tolist()]
            return [
                weights[0] * x / sum(a) + weights[1] * y / sum(b) + weights[2] / c
                for x, y in zip(a, b)
            ]

        return probs

    fitted = _nll_loop(mix(w), z, labels)
    out = ets(z)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(400, dtype=torch.float64))
    assert F.cross_entropy(out, labels).item() == pytest.approx(fitted, rel=1e-10)
    # A grid over the simplex finds nothing better.
    grid = [
        (i / 10, j / 10, 1 - i / 10 - j / 10)
        for i, j in itertools.product(range(11), range(11))
        if i + j <= 10 and (i, j) != (0, 0)
    ]
    best = min(_nll_loop(mix(g), z[:200], labels[:200]) for g in grid)
    assert _nll_loop(mix(w), z[:200], labels[:200]) <= best + 0.01
    assert torch.equal(out.argmax(1), z.argmax(1))  # accuracy preserved
    assert abs(sum(w) - 1) < 1e-12 and min(w) >= 0


def test_ets_mse_and_bad_inputs():
    z, labels = _problem()
    ets = EnsembleTemperatureScaling(loss="mse").double().fit(z, labels)
    assert ets(z).shape == z.shape
    with pytest.raises(ValueError, match="probability vectors"):
        EnsembleTemperatureScaling().fit(z.softmax(1), labels)
    with pytest.raises(ValueError, match="loss must be one of"):
        EnsembleTemperatureScaling(loss="ce")


# ------------------------------------------------------------------- vector / matrix scaling


def _loop_objective_and_gradient(model, z, labels, matrix):
    """Mean NLL and its gradient by explicit loops over samples and classes (float64)."""
    c = z.shape[1]
    w = model.scale.detach().double()
    b = model.bias.detach().double()
    grad_w = torch.zeros_like(w)
    grad_b = torch.zeros_like(b)
    total = 0.0
    n = z.shape[0]
    for i in range(n):
        if matrix:
            out = [
                sum(w[k, j].item() * z[i, j].item() for j in range(c)) + b[k].item()
                for k in range(c)
            ]
        else:
            out = [w[k].item() * z[i, k].item() + b[k].item() for k in range(c)]
        m = max(out)
        s = sum(math.exp(v - m) for v in out)
        p = [math.exp(v - m) / s for v in out]
        y = int(labels[i])
        total -= math.log(p[y])
        for k in range(c):
            d = (p[k] - (1.0 if k == y else 0.0)) / n
            grad_b[k] += d
            if matrix:
                for j in range(c):
                    grad_w[k, j] += d * z[i, j].item()
            else:
                grad_w[k] += d * z[i, k].item()
    return total / n, grad_w, grad_b


@pytest.mark.parametrize("matrix", [False, True])
def test_vector_and_matrix_scaling_reach_the_stationary_point(matrix):
    z, labels = _problem(n=150, c=4)
    model = (MatrixScaling(4) if matrix else VectorScaling(4)).double().fit(z, labels)
    loss, grad_w, grad_b = _loop_objective_and_gradient(model, z[:150], labels[:150], matrix)
    assert F.cross_entropy(model(z), labels).item() == pytest.approx(loss, rel=1e-10)
    assert grad_w.abs().max() < 1e-5 and grad_b.abs().max() < 1e-5
    identity = MatrixScaling(4) if matrix else VectorScaling(4)
    assert loss < F.cross_entropy(identity.double()(z), labels).item()


def test_matrix_scaling_odir_penalty_shrinks_the_off_diagonal():
    z, labels = _problem(n=200, c=4)
    free = MatrixScaling(4).double().fit(z, labels)
    odir = MatrixScaling(4, off_diagonal=10.0, bias=10.0).double().fit(z, labels)

    def off(m):
        w = m.scale.detach()
        return (w - torch.diag(torch.diagonal(w))).abs().sum().item()

    assert off(odir) < 0.5 * off(free)
    assert odir.bias.detach().abs().sum() < free.bias.detach().abs().sum()
    with pytest.raises(ValueError, match="off_diagonal must be a finite number"):
        MatrixScaling(4, off_diagonal=-1.0)
    with pytest.raises(ValueError, match="logits must have num_classes=4 columns"):
        free(torch.randn(3, 5, dtype=torch.float64))


# -------------------------------------------------------------------------- binning


def _confidence_correct_loop(z, labels):
    conf, correct = [], []
    for i in range(z.shape[0]):
        row = z[i].tolist()
        m = max(row)
        s = sum(math.exp(v - m) for v in row)
        p = [math.exp(v - m) / s for v in row]
        k = max(range(len(p)), key=lambda j: p[j])
        conf.append(p[k])
        correct.append(1.0 if k == int(labels[i]) else 0.0)
    return conf, correct


def test_histogram_binning_matches_an_explicit_loop():
    z, labels = _problem(n=300)
    hb = HistogramBinning(n_bins=10).fit(z, labels)
    conf, correct = _confidence_correct_loop(z, labels)
    expected = []
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        members = [y for c, y in zip(conf, correct) if (lo < c <= hi) or (b == 0 and c == 0)]
        expected.append(sum(members) / len(members) if members else (lo + hi) / 2)
    torch.testing.assert_close(hb.bin_values, torch.tensor(expected, dtype=torch.float64))
    z_test, _ = _problem(n=50, seed=1)
    conf_test, _ = _confidence_correct_loop(z_test, torch.zeros(50, dtype=torch.long))
    want = [expected[min(9, max(0, math.ceil(c * 10) - 1))] for c in conf_test]
    got = hb.calibrated_confidence(z_test)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    probs = hb(z_test).softmax(1)
    assert torch.equal(probs.argmax(1), z_test.argmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(50, dtype=torch.float64))
    want = torch.tensor(want, dtype=torch.float64)
    keep = want > 0.5  # no raised floor: the calibrated confidence is exact
    torch.testing.assert_close(probs.max(1).values[keep], want[keep])


def test_quantile_binning_has_equal_mass_bins_and_handles_ties():
    z, labels = _problem(n=400)
    hb = HistogramBinning(n_bins=4, binning="quantile").fit(z, labels)
    conf = torch.softmax(z, 1).amax(1)
    counts = torch.bincount(hb._bucket(conf), minlength=len(hb.edges) - 1)
    assert counts.min() >= 99 and counts.max() <= 101
    tied = torch.zeros(40, 3, dtype=torch.float64)
    tied[:, 0] = 3.0  # every confidence the same
    hb = HistogramBinning(n_bins=5, binning="quantile").fit(tied, torch.zeros(40, dtype=torch.long))
    assert torch.isfinite(hb(tied)).all()


def test_unfitted_binning_refuses_to_run():
    with pytest.raises(RuntimeError, match="not fitted"):
        HistogramBinning()(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        IsotonicCalibration()(torch.randn(3, 4))


def _pav_slow(y, w):
    """Reference: repeatedly pool the first violating adjacent pair of blocks."""
    blocks = [[v, m, 1] for v, m in zip(y, w)]
    changed = True
    while changed:
        changed = False
        for i in range(len(blocks) - 1):
            if blocks[i][0] > blocks[i + 1][0]:
                a, b = blocks[i], blocks.pop(i + 1)
                a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1])
                a[1] += b[1]
                a[2] += b[2]
                changed = True
                break
    return [v for v, _, n in blocks for _ in range(n)]


def test_pav_matches_a_slow_pooling_loop():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(60, generator=g, dtype=torch.float64)
    w = torch.rand(60, generator=g, dtype=torch.float64) + 0.1
    np.testing.assert_allclose(
        pool_adjacent_violators(y, w).numpy(), _pav_slow(y.tolist(), w.tolist()), rtol=1e-12
    )


def test_isotonic_matches_scikit_learn():
    z, labels = _problem(n=500, scale=2.0)
    z = torch.cat([z, z[:50]])  # tied confidences
    labels = torch.cat([labels, (labels[:50] + 1) % 5])
    iso = IsotonicCalibration().fit(z, labels)
    conf, correct = _confidence_correct_loop(z, labels)
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(conf, correct)
    z_test, _ = _problem(n=200, seed=3, scale=4.0)  # wider: some beyond the fitted range
    conf_test, _ = _confidence_correct_loop(z_test, torch.zeros(200, dtype=torch.long))
    want = reference.predict(np.array(conf_test))
    np.testing.assert_allclose(iso.calibrated_confidence(z_test).numpy(), want, rtol=0, atol=1e-12)
    probs = iso(z_test).softmax(1)
    assert torch.equal(probs.argmax(1), z_test.argmax(1))


def test_top_label_logits_keeps_the_prediction_and_the_proportions():
    z = torch.tensor(
        [[2.0, 1.0, 0.0], [0.0, 3.0, 2.9], [5.0, 5.0 - 1e-3, -20.0]], dtype=torch.float64
    )
    conf = torch.tensor([0.5, 0.01, 0.999], dtype=torch.float64)
    q = top_label_logits(z, conf).softmax(1)
    assert torch.equal(q.argmax(1), z.argmax(1))
    p = z.softmax(1)
    assert q[0, 0].item() == pytest.approx(0.5, rel=1e-12)
    assert (q[0, 1] / q[0, 2]).item() == pytest.approx((p[0, 1] / p[0, 2]).item(), rel=1e-12)
    assert q[1, 1] > q[1, 2]  # floor raised: the predicted class is still the argmax
    assert torch.isfinite(
        top_label_logits(z, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    ).all()
