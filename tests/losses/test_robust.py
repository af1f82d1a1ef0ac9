"""GCE and the truncated Lq loss against slow float64 references, limits, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_losses.losses import generalized_cross_entropy, truncated_lq_loss
from lightning_losses.losses.robust import lq_of


def _reference_probabilities(logits, labels):
    """p_y by an explicit softmax, one row at a time, in Python floats."""
    out = []
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        out.append(exps[y] / sum(exps))
    return out


def reference_gce(logits, labels, q):
    ps = _reference_probabilities(logits, labels)
    return sum((1.0 - p**q) / q for p in ps) / len(ps)


def reference_truncated(logits, labels, q, k, weights=None):
    ps = _reference_probabilities(logits, labels)
    ws = [1.0] * len(ps) if weights is None else [float(w) for w in weights]
    lk = (1.0 - k**q) / q
    return sum(w * ((1.0 - p**q) / q - lk) for w, p in zip(ws, ps)) / len(ps)


def _batch(seed=0, b=9, c=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, labels


@pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_gce_matches_the_reference(q, seed):
    logits, labels = _batch(seed)
    out = generalized_cross_entropy(logits, labels, q=q)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(reference_gce(logits, labels, q), rel=1e-12)
    ps = _reference_probabilities(logits, labels)
    assert out.label_probability.item() == pytest.approx(sum(ps) / len(ps), rel=1e-12)


def test_gce_limits_ce_at_small_q_and_mae_at_one():
    logits, labels = _batch(3, scale=2.0)
    ce = F.cross_entropy(logits, labels)
    small = generalized_cross_entropy(logits, labels, q=1e-7).loss
    assert small.item() == pytest.approx(ce.item(), rel=1e-5)
    # the error shrinks linearly in q (first-order term q * E[log^2 p] / 2)
    gap_a = abs(generalized_cross_entropy(logits, labels, q=1e-2).loss - ce).item()
    gap_b = abs(generalized_cross_entropy(logits, labels, q=1e-3).loss - ce).item()
    assert gap_b == pytest.approx(gap_a / 10, rel=0.05)
    p = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    mae = generalized_cross_entropy(logits, labels, q=1.0).loss
    torch.testing.assert_close(mae, (1 - p).mean(), rtol=1e-12, atol=0)


def test_gce_gradient_matches_the_closed_form_and_gradcheck():
    # d/dz_j of (1 - p_y^q)/q = -p_y^q (1[j = y] - p_j): CE's gradient weighted by p_y^q.
    logits, labels = _batch(4)
    z = logits.clone().requires_grad_(True)
    generalized_cross_entropy(z, labels, q=0.7).loss.backward()
    p = F.softmax(logits, dim=1)
    py = p.gather(1, labels[:, None])
    expected = -(py**0.7) * (F.one_hot(labels, 5).double() - p) / len(labels)
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: generalized_cross_entropy(t, labels, q=0.3).loss,
        (logits.clone().requires_grad_(),),
    )


@pytest.mark.parametrize("k", [0.2, 0.5, 0.9])
def test_truncated_matches_the_reference_with_and_without_weights(k):
    logits, labels = _batch(5, b=12)
    weights = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1])
    for w in (None, weights, weights.bool(), weights.float()):
        out = truncated_lq_loss(logits, labels, q=0.7, k=k, weights=w)
        expected = reference_truncated(logits, labels, 0.7, k, None if w is None else weights)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        kept = 1.0 if w is None else 8 / 12
        assert out.kept.item() == pytest.approx(kept)


def test_truncated_without_weights_is_gce_minus_a_constant():
    logits, labels = _batch(6)
    gce = generalized_cross_entropy(logits, labels, q=0.7).loss
    tl = truncated_lq_loss(logits, labels, q=0.7, k=0.5).loss
    assert (gce - tl).item() == pytest.approx((1 - 0.5**0.7) / 0.7, rel=1e-12)
    assert lq_of(0.5, 0.7) == pytest.approx((1 - 0.5**0.7) / 0.7, rel=1e-14)
    torch.testing.assert_close(
        lq_of(torch.tensor([0.5], dtype=torch.float64), 0.7),
        torch.tensor([(1 - 0.5**0.7) / 0.7], dtype=torch.float64),
    )


def test_truncated_pruned_samples_get_no_gradient():
    logits, labels = _batch(7, b=6)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    z = logits.clone().requires_grad_(True)
    truncated_lq_loss(z, labels, weights=weights).loss.backward()
    assert torch.all(z.grad[weights == 0] == 0)
    assert torch.all(z.grad[weights == 1].abs().sum(dim=1) > 0)
    assert torch.autograd.gradcheck(
        lambda t: truncated_lq_loss(t, labels, q=0.7, k=0.5, weights=weights).loss,
        (logits.clone().requires_grad_(),),
    )


def test_low_precision_is_computed_in_float32():
    logits, labels = _batch(8)
    for dtype in (torch.bfloat16, torch.float16):
        half = logits.to(dtype)
        out = generalized_cross_entropy(half, labels)
        assert out.loss.dtype == torch.float32
        expected = reference_gce(half.double(), labels, 0.7)
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)
        assert truncated_lq_loss(half, labels).loss.dtype == torch.float32


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]])
    labels = torch.tensor([1, 1])  # p_y = 0 (underflows) then p_y = 1
    out = generalized_cross_entropy(logits, labels, q=0.7)
    assert out.loss.item() == pytest.approx(0.5 / 0.7)
    z = logits.clone().requires_grad_(True)
    truncated_lq_loss(z, labels).loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda z, y: generalized_cross_entropy(z, y, q=0.0), "q must be"),
        (lambda z, y: generalized_cross_entropy(z, y, q=1.5), "q must be"),
        (lambda z, y: generalized_cross_entropy(z, y, q=float("nan")), "q must be"),
        (lambda z, y: truncated_lq_loss(z, y, k=0.0), "k must be"),
        (lambda z, y: truncated_lq_loss(z, y, k=1.0), "k must be"),
        (lambda z, y: generalized_cross_entropy(z[0], y), r"logits must be a tensor of shape"),
        (lambda z, y: generalized_cross_entropy(z.long(), y), "floating-point"),
        (lambda z, y: generalized_cross_entropy(z, y.float()), "integer tensor"),
        (lambda z, y: generalized_cross_entropy(z, y[:3]), "4 entries"),
        (lambda z, y: generalized_cross_entropy(z, y + 3), r"in \[0, 3\)"),
        (lambda z, y: generalized_cross_entropy(z, y - 1), r"in \[0, 3\)"),
        (lambda z, y: generalized_cross_entropy(z[:0], y[:0]), "B = 0"),
        (lambda z, y: generalized_cross_entropy(z[:, :1], y * 0), "C >= 2"),
        (lambda z, y: truncated_lq_loss(z, y, weights=torch.ones(3)), "4 entries"),
        (lambda z, y: truncated_lq_loss(z, y, weights=torch.full((4,), 0.5)), r"only 0 and 1"),
        (lambda z, y: truncated_lq_loss(z, y, weights=torch.ones(4, 1)), "weights must be"),
        (lambda z, y: generalized_cross_entropy(z.index_fill(0, y[:1], float("nan")), y), "NaN"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, match):
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=match):
        call(logits, labels)
