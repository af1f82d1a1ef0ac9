"""Calibration objectives (CA loss, CE, Brier-as-MSE) against slow float64 loop references."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.losses import (
    CalibrationCrossEntropy,
    CalibrationMSE,
    CorrectnessAwareLoss,
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
    correctness_aware_objective,
    correctness_weights,
)


def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference_ca(logits, labels) -> float:
    """The paper's CA loss, sample by sample, in float64 Python."""
    rows = logits.double().tolist()
    labels = [int(v) for v in labels]
    conf, correct = [], []
    for row, label in zip(rows, labels):
        probs = _softmax_row(row)
        pred = max(range(len(row)), key=lambda k: row[k])
        conf.append(probs[pred])
        correct.append(1.0 if pred == label else 0.0)
    acc = sum(correct) / len(correct)
    weights = [(1 - acc) if y == 1.0 else acc for y in correct]
    sq = [(c - y) ** 2 for c, y in zip(conf, correct)]
    if sum(weights) == 0:
        return sum(sq) / len(sq)
    return sum(w * s for w, s in zip(weights, sq)) / sum(weights)


def reference_brier(logits, labels) -> float:
    total = 0.0
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        probs = _softmax_row(row)
        total += sum((p - (1.0 if k == label else 0.0)) ** 2 for k, p in enumerate(probs))
    return total / len(labels)


def reference_nll(logits, labels) -> float:
    total = 0.0
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        total -= math.log(_softmax_row(row)[label])
    return total / len(labels)


def _batch(seed: int, n: int = 23, c: int = 5, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    # Labels equal to the argmax half of the time: a mixed batch with accuracy well inside (0, 1).
    labels = torch.where(
        torch.rand(n, generator=g) < 0.5, logits.argmax(1), torch.randint(0, c, (n,), generator=g)
    )
    return logits, labels


@pytest.mark.parametrize("seed", range(5))
def test_ca_matches_loop_reference(seed):
    logits, labels = _batch(seed)
    correct = (logits.argmax(1) == labels).double().mean().item()
    assert 0.0 < correct < 1.0
    loss = correctness_aware_loss(logits, labels).loss
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(reference_ca(logits, labels), abs=1e-12, rel=0)


def test_ca_float32_matches_reference():
    logits, labels = _batch(7, n=200, c=10)
    loss = correctness_aware_loss(logits.float(), labels).loss
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_ca(logits.float(), labels), abs=1e-6)


def test_all_correct_and_all_wrong_fall_back_to_unweighted_mean():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64)
    conf = logits.softmax(1).amax(1)
    right = logits.argmax(1)
    wrong = (right + 1) % 4

    _, w = correctness_weights(logits, right)
    assert torch.count_nonzero(w) == 0
    loss = correctness_aware_loss(logits, right).loss
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(((conf - 1) ** 2).mean().item(), abs=1e-14)
    assert loss.item() == pytest.approx(reference_ca(logits, right), abs=1e-14)

    loss = correctness_aware_loss(logits, wrong).loss
    assert loss.item() == pytest.approx((conf**2).mean().item(), abs=1e-14)

    # Gradients stay finite too, and B = 1 is a valid (all-correct) batch.
    x = logits.clone().requires_grad_(True)
    correctness_aware_loss(x, wrong).loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    one = correctness_aware_loss(logits[:1], right[:1]).loss
    assert one.item() == pytest.approx((conf[0] - 1).item() ** 2, abs=1e-14)


def test_class_balance_weights_nine_correct_one_wrong():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 3, generator=g, dtype=torch.float64) * 2
    labels = logits.argmax(1).clone()
    labels[4] = (labels[4] + 1) % 3  # the one wrong sample
    correct, weights = correctness_weights(logits, labels)
    expected_correct = torch.ones(10, dtype=torch.float64)
    expected_correct[4] = 0.0
    torch.testing.assert_close(correct, expected_correct)
    expected_w = torch.full((10,), 0.1, dtype=torch.float64)
    expected_w[4] = 0.9  # a = 0.9: the wrong sample weighs as much as the nine correct together
    torch.testing.assert_close(weights, expected_w, rtol=0, atol=1e-15)

    conf = logits.softmax(1).amax(1)
    sq = (conf - expected_correct) ** 2
    expected = (0.1 * sq[expected_correct == 1].sum() + 0.9 * sq[4]) / (0.1 * 9 + 0.9)
    loss = correctness_aware_loss(logits, labels).loss
    assert loss.item() == pytest.approx(expected.item(), abs=1e-14)
    assert loss.item() != pytest.approx(sq.mean().item(), abs=1e-3)  # not the unweighted mean

    # On the wrong sample's row: weight 0.9 / 1.8 instead of 1 / 10, a 5x larger gradient.
    x = logits.clone().requires_grad_(True)
    correctness_aware_loss(x, labels).loss.backward()
    y = logits.clone().requires_grad_(True)
    ((y.softmax(1).amax(1) - expected_correct) ** 2).mean().backward()
    torch.testing.assert_close(x.grad[4], y.grad[4] * 10 * 0.9 / 1.8, rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_ca_gradcheck(seed):
    logits, labels = _batch(seed, n=9, c=4)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: correctness_aware_loss(t, labels).loss, (x,))
    right = logits.argmax(1)
    assert torch.autograd.gradcheck(lambda t: correctness_aware_loss(t, right).loss, (x,))


def test_no_gradient_through_correctness_or_weights():
    """Autograd gradient == gradient of the formula with y_i, w_i frozen as Python constants."""
    logits, labels = _batch(4, n=15, c=6)
    correct = [float(v) for v in (logits.argmax(1) == labels).tolist()]
    acc = sum(correct) / len(correct)
    weights = torch.tensor([(1 - acc) if y else acc for y in correct], dtype=torch.float64)
    targets = torch.tensor(correct, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    correctness_aware_loss(x, labels).loss.backward()
    y = logits.clone().requires_grad_(True)
    conf = y.softmax(1).gather(1, y.argmax(1, keepdim=True)).squeeze(1)
    ((weights * (conf - targets) ** 2).sum() / weights.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-14)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "fn",
    [correctness_aware_loss, calibration_cross_entropy, calibration_mse],
    ids=lambda f: f.__name__,
)
def test_low_precision_inputs_are_computed_in_float32(dtype, fn):
    logits, labels = _batch(5, n=64, c=10)
    low = logits.to(dtype)
    out = fn(low, labels).loss
    assert out.dtype == torch.float32
    exact = fn(low.double(), labels).loss  # same rounded inputs, float64
    assert out.item() == pytest.approx(exact.item(), abs=1e-6)


def test_autocast_is_disabled_inside():
    logits, labels = _batch(6, n=64, c=10)
    x = logits.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = correctness_aware_loss(x * 1.0, labels).loss
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference_ca(x.detach(), labels), abs=1e-6)
    out.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("objective", "reference", "upper"),
    [(calibration_mse, reference_brier, 2.0), (calibration_cross_entropy, reference_nll, math.inf)],
    ids=["mse_is_brier", "ce_is_nll"],
)
def test_mse_and_cross_entropy_match_their_references(objective, reference, upper, seed):
    logits, labels = _batch(seed, n=17, c=6)
    out = objective(logits, labels).loss
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(reference(logits, labels), abs=1e-12)
    assert 0.0 <= out.item() <= upper
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: objective(t, labels).loss, (x,))


def test_objectives_rank_the_paper_toy_example():
    """The authors' toy sample (true cat, predicted dog): CA prefers the flattened output."""
    probs = {
        "uncalibrated": [0.412, 0.455, 0.068, 0.065],
        "ce": [0.399, 0.538, 0.032, 0.030],
        "ca": [0.274, 0.292, 0.220, 0.214],
    }
    labels = torch.tensor([0])  # cat
    ca = {
        k: correctness_aware_loss(torch.tensor([v]).log(), labels).loss.item()
        for k, v in probs.items()
    }
    assert ca["ca"] < ca["uncalibrated"] < ca["ce"]
    # A wrong-only batch: the CA loss is the squared confidence of the predicted class.
    assert ca["uncalibrated"] == pytest.approx(0.455**2, rel=1e-6)


def test_modules_match_functions():
    logits, labels = _batch(8)
    for module, fn in [
        (CorrectnessAwareLoss(), correctness_aware_loss),
        (CalibrationCrossEntropy(), calibration_cross_entropy),
        (CalibrationMSE(), calibration_mse),
    ]:
        torch.testing.assert_close(tuple(module(logits, labels)), tuple(fn(logits, labels)))


LONG = torch.long


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (torch.randn(4), torch.zeros(4, dtype=LONG), r"logits must be a tensor of shape \(N, C\)"),
        (
            torch.randn(4, 3, 2),
            torch.zeros(4, dtype=LONG),
            r"logits must be a tensor of shape \(N, C\)",
        ),
        (torch.ones(4, 3, dtype=LONG), torch.zeros(4, dtype=LONG), "logits must be a floating"),
        (torch.randn(4, 1), torch.zeros(4, dtype=LONG), r"logits must have C >= 2"),
        (torch.randn(0, 3), torch.zeros(0, dtype=LONG), "logits must hold at least one"),
        (torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, dtype=LONG), "logits must be finite"),
        (torch.tensor([[float("inf"), 1.0]]), torch.zeros(1, dtype=LONG), "logits must be finite"),
        (
            torch.randn(4, 3),
            torch.zeros(5, dtype=LONG),
            r"labels must have one entry per row of logits \(4\), got 5",
        ),
        (torch.randn(4, 3), torch.zeros(4), "labels must be an integer"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.bool), "labels must be an integer"),
        (
            torch.randn(4, 3),
            torch.zeros(4, 3, dtype=LONG),
            r"labels must be a tensor of shape \(B,\)",
        ),
        (
            torch.randn(4, 3),
            torch.tensor([0, 1, 3, 0]),
            r"labels must be class indices in \[0, 3\)",
        ),
        (torch.randn(4, 3), torch.tensor([0, -1, 2, 0]), r"labels must be class indices"),
        ([[0.0, 1.0]], torch.zeros(1, dtype=LONG), r"logits must be a tensor of shape \(N, C\)"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [correctness_aware_loss, calibration_cross_entropy, calibration_mse, correctness_weights],
    ids=lambda f: f.__name__,
)
def test_bad_input_raises_value_error(fn, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(logits, labels)


@pytest.mark.parametrize(
    "fn",
    [correctness_aware_loss, calibration_cross_entropy, calibration_mse],
    ids=lambda f: f.__name__,
)
def test_outputs_carry_batch_accuracy_and_mean_confidence(fn):
    logits, labels = _batch(9, n=31, c=5)
    out = fn(logits, labels)
    assert out._fields[0] == "loss" and out.loss is out[0]
    accuracy = sum(int(r.index(max(r)) == y) for r, y in zip(logits.tolist(), labels.tolist()))
    assert out.accuracy.item() == pytest.approx(accuracy / 31, abs=1e-15)
    confidence = sum(max(_softmax_row(r)) for r in logits.tolist()) / 31
    assert out.confidence.item() == pytest.approx(confidence, abs=1e-12)
    assert not out.accuracy.requires_grad and not out.confidence.requires_grad


def test_unweighted_ca_is_the_plain_mean_and_bad_weighting_raises():
    logits, labels = _batch(10, n=40, c=4)
    conf = logits.softmax(1).amax(1)
    correct = (logits.argmax(1) == labels).double()
    plain = correctness_aware_loss(logits, labels, weighting="none").loss
    assert plain.item() == pytest.approx(((conf - correct) ** 2).mean().item(), abs=1e-14)
    balanced = correctness_aware_loss(logits, labels).loss
    assert balanced.item() != pytest.approx(plain.item(), abs=1e-4)
    module = CorrectnessAwareLoss(weighting="none")
    assert module(logits, labels).loss.item() == plain.item()
    with pytest.raises(ValueError, match="weighting must be one of"):
        correctness_aware_loss(logits, labels, weighting="class")
    with pytest.raises(ValueError, match="weighting must be one of"):
        CorrectnessAwareLoss(weighting="Balanced")


@pytest.mark.parametrize("weighting", ["balanced", "split", "none"])
def test_closed_form_objective_coefficients_match_the_loop_and_autograd(weighting):
    """The fitting loop's per-epoch _objective_coefficients k: in every batch (a mixed one, an
    all-correct one, an all-wrong one, a last smaller one) 0.5 * sum k (c - y)^2 is the value
    of correctness_aware_objective (and of the float64 loop reference for the paper's
    weights) and k (c - y) is autograd's gradient in confidence."""
    from lightning_losses.losses.calibration import _objective_coefficients

    logits, labels = _batch(7, n=40)
    pred = logits.argmax(1)
    labels[10:20] = pred[10:20]  # all correct
    labels[20:30] = (pred[20:30] + 1) % logits.shape[1]  # all wrong
    sizes = [10, 10, 10, 7, 3]
    correct = (pred == labels).double()
    conf = torch.softmax(logits, 1).amax(1)
    accuracy = torch.tensor(0.7, dtype=torch.float64) if weighting == "split" else None
    k = _objective_coefficients(correct, sizes, weighting, accuracy)
    assert k.shape == (40,) and k.dtype == torch.float64
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        c = conf[rows].clone().requires_grad_()
        expected = correctness_aware_objective(c, correct[rows], weighting, accuracy).loss
        (expected_grad,) = torch.autograd.grad(expected, c)
        delta = conf[rows] - correct[rows]
        value = 0.5 * (k[rows] * delta * delta).sum()
        assert value.item() == pytest.approx(expected.item(), rel=1e-13, abs=1e-15)
        torch.testing.assert_close(k[rows] * delta, expected_grad, rtol=1e-12, atol=1e-15)
        if weighting == "balanced":
            ref = reference_ca(logits[rows], labels[rows])
            assert value.item() == pytest.approx(ref, rel=1e-12)
        one_group = bool(correct[rows].all() or not correct[rows].any())
        if weighting == "none" or (one_group and weighting == "balanced"):  # plain mean
            torch.testing.assert_close(k[rows], torch.full((size,), 2.0 / size).double())
