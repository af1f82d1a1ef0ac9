"""Calibration metrics against slow float64 loop references, on edge cases, and across ranks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor
from torch_fakes import run_gloo
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from lightning_losses.metrics import (
    NLL_MIN_PROB,
    BrierScore,
    CalibrationError,
    ClasswiseCalibrationError,
    CorrectnessAUROC,
    NegativeLogLikelihood,
    brier_score,
    calibration_bins,
    calibration_error,
    classwise_calibration_error,
    confidences_and_correct,
    correctness_auroc,
    negative_log_likelihood,
    reliability_diagram,
    uniform_bin_index,
)

NORMS = ["l1", "l2", "max"]
BINNINGS = ["uniform", "quantile"]
TOL = {"rtol": 0.0, "atol": 1e-6}  # results are float32 of float64 computations

# --------------------------------------------------------------------------------------------
# Slow references: plain Python floats (float64), one sample at a time.


def ref_conf_correct(probs, labels):
    out = []
    for row, y in zip(probs.double().tolist(), labels.tolist()):
        best = 0
        for k in range(len(row)):
            if row[k] > row[best]:
                best = k
        out.append((row[best], 1.0 if best == y else 0.0))
    return out


def ref_uniform_bin(c, n_bins):
    """Smallest b with c <= (b + 1) / M, capped at M - 1: bins (b/M, (b+1)/M], 0 in the first."""
    b = 0
    while b < n_bins - 1 and not c <= (b + 1) / n_bins:
        b += 1
    return b


def ref_error_from_groups(groups, norm):
    """groups: list of lists of (confidence, correctness); empty groups are skipped."""
    n = sum(len(g) for g in groups)
    l1 = l2 = 0.0
    worst = -1.0
    for g in groups:
        if not g:
            continue
        acc = sum(a for _, a in g) / len(g)
        conf = sum(c for c, _ in g) / len(g)
        l1 += len(g) / n * abs(acc - conf)
        l2 += len(g) / n * (acc - conf) ** 2
        worst = max(worst, abs(acc - conf))
    return {"l1": l1, "l2": math.sqrt(l2), "max": worst}[norm]


def ref_calibration_error(pairs, n_bins, binning, norm):
    if binning == "uniform":
        groups = [[] for _ in range(n_bins)]
        for c, a in pairs:
            groups[ref_uniform_bin(c, n_bins)].append((c, a))
        return ref_error_from_groups(groups, norm)
    ordered = sorted(pairs)
    # Equal confidences are exchangeable: each gets the mean correctness of its run of ties.
    smoothed = []
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        mean_a = sum(a for _, a in ordered[i:j]) / (j - i)
        smoothed += [(ordered[k][0], mean_a) for k in range(i, j)]
        i = j
    n = len(smoothed)
    groups = [[] for _ in range(n_bins)]
    for rank, pair in enumerate(smoothed):
        groups[rank * n_bins // n].append(pair)
    return ref_error_from_groups(groups, norm)


def ref_classwise(probs, labels, n_bins, norm):
    rows, ys = probs.double().tolist(), labels.tolist()
    values = []
    for c in range(len(rows[0])):
        pairs = [(row[c], 1.0 if y == c else 0.0) for row, y in zip(rows, ys)]
        values.append(ref_calibration_error(pairs, n_bins, "uniform", norm))
    return sum(values) / len(values)


def ref_brier(probs, labels, top_label):
    if top_label:
        pairs = ref_conf_correct(probs, labels)
        return sum((c - a) ** 2 for c, a in pairs) / len(pairs)
    total = 0.0
    for row, y in zip(probs.double().tolist(), labels.tolist()):
        total += sum((p - (1.0 if k == y else 0.0)) ** 2 for k, p in enumerate(row))
    return total / len(labels)


def ref_nll(probs, labels):
    rows, ys = probs.double().tolist(), labels.tolist()
    return sum(-math.log(max(row[y], NLL_MIN_PROB)) for row, y in zip(rows, ys)) / len(ys)


def ref_auroc(probs, labels):
    pairs = ref_conf_correct(probs, labels)
    pos = [c for c, a in pairs if a == 1.0]
    neg = [c for c, a in pairs if a == 0.0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------------------------
# Data


def random_probs(n, c, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    probs = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).softmax(dim=1)
    # Labels that agree with the argmax ~60% of the time: both correct and wrong predictions.
    labels = torch.where(
        torch.rand(n, generator=g) < 0.6,
        probs.argmax(dim=1),
        torch.randint(0, c, (n,), generator=g),
    )
    return probs.to(dtype), labels


def tied_probs(n, seed):
    """Rows from a small pool of exact binary fractions: tied confidences, some exactly 1.0 and
    exactly on the edges of 4 or 8 equal-width bins."""
    pool = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.25, 0.25, 0.0],
            [0.25, 0.75, 0.0, 0.0],
            [0.375, 0.25, 0.25, 0.125],
            [0.0, 0.0, 0.625, 0.375],
            [0.0, 0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(seed)
    probs = pool[torch.randint(0, len(pool), (n,), generator=g)]
    return probs, torch.randint(0, 4, (n,), generator=g)


def mixed_data(seed):
    probs, labels = random_probs(150, 4, seed)
    tp, tl = tied_probs(90, seed)
    return torch.cat([probs, tp]), torch.cat([labels, tl])


# --------------------------------------------------------------------------------------------
# Functional metrics against the references


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("seed,n_bins", [(0, 15), (1, 4), (2, 8), (3, 1)])
def test_calibration_error_matches_reference(seed, n_bins, binning, norm):
    probs, labels = mixed_data(seed)
    got = calibration_error(probs, labels, n_bins=n_bins, binning=binning, norm=norm)
    want = ref_calibration_error(ref_conf_correct(probs, labels), n_bins, binning, norm)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_probs_are_binned_by_their_exact_value(dtype):
    probs, labels = random_probs(300, 10, seed=4, dtype=dtype)
    want = ref_calibration_error(ref_conf_correct(probs, labels), 15, "uniform", "l1")
    got = calibration_error(probs, labels)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **TOL)


def test_bin_edges_convention():
    # (e_b, e_{b+1}]: an edge belongs to the bin below it; 0 to the first bin, 1 to the last.
    values = torch.tensor([0.0, 0.25, 0.2500001, 0.5, 0.75, 0.99, 1.0], dtype=torch.float64)
    assert uniform_bin_index(values, 4).tolist() == [0, 0, 1, 1, 2, 3, 3]
    # Compared in float64 against exact b / M: float32(0.1) = 0.10000000149 is above the edge 0.1.
    assert uniform_bin_index(torch.tensor([0.1], dtype=torch.float64), 10).item() == 0
    assert uniform_bin_index(torch.tensor([0.1], dtype=torch.float32), 10).item() == 1


def test_confidence_zero_and_one_land_in_real_bins():
    conf = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    correct = torch.tensor([False, False, True, True, False])
    bins = calibration_bins(conf, correct, n_bins=15)
    assert bins.count.shape == (15,)
    assert bins.count[0] == 2 and bins.count[-1] == 3 and bins.count.sum() == 5
    assert bins.sum_correct[-1] == 2
    # One-hot probabilities (float32 softmax of large logits gives exactly 1.0).
    probs = torch.tensor([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]]).softmax(1)
    assert (probs.max(dim=1).values == 1.0).all()
    labels = torch.tensor([0, 1, 0])
    for binning in BINNINGS:
        ece = calibration_error(probs, labels, binning=binning)
        assert ece.item() == pytest.approx(1 / 3, abs=1e-7)
    # Class-wise: every p_c is exactly 0 or 1.
    cw = classwise_calibration_error(probs, labels)
    assert cw.item() == pytest.approx(ref_classwise(probs, labels, 15, "l1"), abs=1e-7)
    assert cw.item() == pytest.approx((1 / 3 + 0 + 1 / 3) / 3, abs=1e-7)


def test_empty_bins_carry_no_weight_and_max_is_over_nonempty_bins():
    # 10 samples at confidence 0.875 with 5 correct (gap 0.375), 30 at 0.625 with 18 correct
    # (gap 0.025); the 13 other bins are empty.
    probs = torch.tensor([[0.875, 0.125]] * 10 + [[0.625, 0.375]] * 30)
    labels = torch.tensor([0] * 5 + [1] * 5 + [0] * 18 + [1] * 12)
    bins = calibration_bins(*confidences_and_correct(probs, labels), n_bins=15)
    assert (bins.count > 0).sum() == 2
    ece = calibration_error(probs, labels, norm="l1")
    assert ece.item() == pytest.approx(10 / 40 * 0.375 + 30 / 40 * 0.025, abs=1e-7)
    # MCE is the largest gap itself, not weighted by its bin's share (the CA code's bug: 0.094).
    assert calibration_error(probs, labels, norm="max").item() == pytest.approx(0.375, abs=1e-7)
    l2 = math.sqrt(10 / 40 * 0.375**2 + 30 / 40 * 0.025**2)
    assert calibration_error(probs, labels, norm="l2").item() == pytest.approx(l2, abs=1e-7)


@pytest.mark.parametrize("binning", BINNINGS)
def test_all_correct_and_all_wrong_sets(binning):
    probs, _ = random_probs(64, 5, seed=5)
    conf = probs.max(dim=1).values
    right = probs.argmax(dim=1)
    wrong = (right + 1) % 5
    # ECE (l1) is defined: mean(1 - conf) when all are correct, mean(conf) when all are wrong.
    ece_right = calibration_error(probs, right, binning=binning)
    ece_wrong = calibration_error(probs, wrong, binning=binning)
    assert ece_right.item() == pytest.approx((1 - conf).mean().item(), abs=1e-6)
    assert ece_wrong.item() == pytest.approx(conf.mean().item(), abs=1e-6)
    for labels in (right, wrong):
        with pytest.warns(UserWarning, match="undefined"):
            auroc = correctness_auroc(probs, labels)
        assert math.isnan(auroc.item())
        metric = CorrectnessAUROC()
        metric.update(probs[:30], labels[:30])
        metric.update(probs[30:], labels[30:])
        with pytest.warns(UserWarning, match="undefined"):
            assert math.isnan(metric.compute().item())


@pytest.mark.parametrize("norm", NORMS)
def test_quantile_bins_with_fewer_samples_than_bins(norm):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 2])
    pairs = ref_conf_correct(probs, labels)
    got = calibration_error(probs, labels, n_bins=15, binning="quantile", norm=norm)
    # Three bins of one sample each.
    gaps = [abs(a - c) for c, a in pairs]
    want = {"l1": sum(gaps) / 3, "l2": math.sqrt(sum(g * g for g in gaps) / 3), "max": max(gaps)}
    assert not torch.isnan(got)
    assert got.item() == pytest.approx(want[norm], abs=1e-6)
    conf, correct = confidences_and_correct(probs, labels)
    count = calibration_bins(conf, correct, 15, "quantile").count
    assert count.shape == (15,) and count[count > 0].tolist() == [1, 1, 1]
    one = calibration_error(probs[:1], labels[:1], binning="quantile", norm=norm)
    assert one.item() == pytest.approx(0.3, abs=1e-6)


def test_quantile_bins_are_equal_mass_by_rank():
    conf = torch.rand(17, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    bins = calibration_bins(conf, conf > 0.5, n_bins=5, binning="quantile")
    assert bins.count.tolist() == [4, 3, 4, 3, 3]
    # Every sample in a lower bin has a confidence <= every sample in a higher bin.
    mean_conf = bins.sum_confidence / bins.count
    assert (mean_conf.diff() > 0).all()


def test_quantile_bins_with_ties_are_order_free_and_sensible():
    # Ten identical confidences (0.5), half correct: every equal-mass bin must read 0.5 / 0.5.
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 10)
    labels = torch.tensor([0, 1] * 5)
    for norm in NORMS:
        got = calibration_error(probs, labels, n_bins=4, binning="quantile", norm=norm)
        assert got.item() == 0.0
    # A heavily tied set: the value does not depend on the order of the samples.
    probs, labels = tied_probs(101, seed=7)
    base = calibration_error(probs, labels, n_bins=6, binning="quantile")
    for seed in range(3):
        perm = torch.randperm(101, generator=torch.Generator().manual_seed(seed))
        assert calibration_error(probs[perm], labels[perm], n_bins=6, binning="quantile") == base
    want = ref_calibration_error(ref_conf_correct(probs, labels), 6, "quantile", "l1")
    assert base.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("seed,n_bins", [(0, 15), (1, 4)])
def test_classwise_calibration_error_matches_reference(seed, n_bins, norm):
    probs, labels = mixed_data(seed)
    got = classwise_calibration_error(probs, labels, n_bins=n_bins, norm=norm)
    want = ref_classwise(probs, labels, n_bins, norm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **TOL)


def test_classwise_includes_classes_without_samples():
    probs, labels = random_probs(40, 3, seed=8)
    padded = torch.cat([probs, torch.zeros(40, 2, dtype=probs.dtype)], dim=1)
    got = classwise_calibration_error(padded, labels)
    # The two extra columns are exactly 0 with no label: perfectly calibrated, CE_c = 0.
    want = classwise_calibration_error(probs, labels) * 3 / 5
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("top_label", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_brier_score_matches_reference(seed, top_label):
    probs, labels = mixed_data(seed)
    got = brier_score(probs, labels, top_label=top_label)
    want = ref_brier(probs, labels, top_label)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **TOL)
    assert 0 <= got <= (1 if top_label else 2)


def test_nll_matches_reference_and_is_finite_at_zero():
    probs, labels = mixed_data(2)  # the tied pool has rows with p_y = 0 exactly
    rows = probs[torch.arange(len(labels)), labels]
    assert (rows == 0).any()
    got = negative_log_likelihood(probs, labels)
    assert torch.isfinite(got)
    torch.testing.assert_close(
        got.double(), torch.tensor(ref_nll(probs, labels), dtype=torch.float64), rtol=1e-6, atol=0
    )
    zero = negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert zero.item() == pytest.approx(-math.log(NLL_MIN_PROB), rel=1e-6)
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(9))
    labels = torch.arange(20) % 6
    torch.testing.assert_close(
        negative_log_likelihood(logits.softmax(1), labels),
        torch.nn.functional.cross_entropy(logits, labels),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correctness_auroc_matches_reference_and_torchmetrics(seed):
    probs, labels = mixed_data(seed)  # many ties between correct and wrong predictions
    got = correctness_auroc(probs, labels)
    torch.testing.assert_close(
        got.double(), torch.tensor(ref_auroc(probs, labels), dtype=torch.float64), **TOL
    )
    conf, correct = confidences_and_correct(probs, labels)
    torch.testing.assert_close(got, binary_auroc(conf.float(), correct.long()), **TOL)
    # Perfect separation and its mirror image.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    assert correctness_auroc(probs, torch.tensor([0, 0, 1, 1])).item() == 1.0
    assert correctness_auroc(probs, torch.tensor([1, 1, 0, 0])).item() == 0.0
    # All confidences tied: 1/2.
    probs = torch.tensor([[0.7, 0.3]] * 4)
    assert correctness_auroc(probs, torch.tensor([0, 1, 0, 1])).item() == 0.5


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_torchmetrics_where_definitions_coincide(seed, norm):
    # Away from exact bin edges and from 1.0, torchmetrics' [lower, upper) bins and float32
    # edges give the same bins as ours, so the values agree.
    probs, labels = random_probs(2000, 10, seed=seed, scale=2.0, dtype=torch.float32)
    conf = probs.max(dim=1).values.double()
    edges = torch.arange(16, dtype=torch.float64) / 15
    keep = (conf[:, None] - edges).abs().min(dim=1).values > 1e-6
    probs, labels = probs[keep], labels[keep]
    assert keep.sum() > 1900 and (probs.max(dim=1).values < 1.0).all()
    ours = calibration_error(probs, labels, n_bins=15, norm=norm)
    theirs = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm=norm)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Input validation


def _functions():
    return [
        calibration_error,
        lambda p, y: calibration_error(p, y, binning="quantile"),
        classwise_calibration_error,
        brier_score,
        negative_log_likelihood,
        correctness_auroc,
        confidences_and_correct,
        reliability_diagram,
    ]


LONG = torch.long
BAD_INPUTS = [
    ("logits", torch.randn(8, 4) * 3, torch.zeros(8, dtype=LONG), "looks like logits"),
    ("sigmoid", torch.full((8, 4), 0.5), torch.zeros(8, dtype=LONG), "sum to 1"),
    ("off_by_1e-2", torch.full((8, 4), 0.2525), torch.zeros(8, dtype=LONG), "sum to 1"),
    ("1-D", torch.full((8,), 0.5), torch.zeros(8, dtype=LONG), "2-D tensor of shape"),
    ("3-D", torch.full((2, 4, 2), 0.5), torch.zeros(2, dtype=LONG), "2-D tensor of shape"),
    ("int probs", torch.ones(8, 1, dtype=LONG), torch.zeros(8, dtype=LONG), "floating-point"),
    ("float labels", torch.full((8, 4), 0.25), torch.zeros(8), "integer tensor"),
    ("bool labels", torch.full((8, 4), 0.25), torch.zeros(8, dtype=torch.bool), "integer tensor"),
    ("2-D labels", torch.full((8, 4), 0.25), torch.zeros(8, 4, dtype=LONG), "1-D tensor"),
    ("length", torch.full((8, 4), 0.25), torch.zeros(7, dtype=LONG), "7 entries"),
    ("label = C", torch.full((8, 4), 0.25), torch.full((8,), 4), r"\[0, 3\]"),
    ("label < 0", torch.full((8, 4), 0.25), torch.full((8,), -1), r"\[0, 3\]"),
    ("nan", torch.full((8, 4), float("nan")), torch.zeros(8, dtype=LONG), "NaN or inf"),
    ("empty", torch.zeros(0, 4), torch.zeros(0, dtype=LONG), "at least one sample"),
    ("numpy", [[1.0]], torch.zeros(1, dtype=LONG), "2-D tensor of shape"),
]


@pytest.mark.parametrize("fn_index", range(len(_functions())))
@pytest.mark.parametrize("name,probs,labels,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_value_error(fn_index, name, probs, labels, match):
    with pytest.raises(ValueError, match=match):
        _functions()[fn_index](probs, labels)


@pytest.mark.parametrize("name,probs,labels,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_metric_update_raises_value_error(name, probs, labels, match):
    if name == "empty":
        return  # an empty update is allowed in a Metric (tested below)
    metrics = [CalibrationError(), CalibrationError(binning="quantile"), BrierScore()]
    metrics += [NegativeLogLikelihood(), CorrectnessAUROC(), ClasswiseCalibrationError(4)]
    for metric in metrics:
        with pytest.raises(ValueError, match=match):
            metric.update(probs, labels)


def test_bad_options_raise_value_error():
    probs, labels = random_probs(10, 3, seed=0)
    for kwargs, match in [
        ({"n_bins": 0}, "n_bins"),
        ({"n_bins": 2.5}, "n_bins"),
        ({"n_bins": True}, "n_bins"),
        ({"binning": "adaptive"}, "binning"),
        ({"norm": "l3"}, "norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            calibration_error(probs, labels, **kwargs)
        with pytest.raises(ValueError, match=match):
            CalibrationError(**kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        ClasswiseCalibrationError(0)
    with pytest.raises(ValueError, match="num_classes=5"):
        ClasswiseCalibrationError(5).update(probs, labels)
    with pytest.raises(ValueError, match="top_label"):
        BrierScore(top_label="yes")


def test_bfloat16_probabilities_pass_the_row_sum_check():
    probs, labels = random_probs(2000, 10, seed=1, scale=4.0, dtype=torch.bfloat16)
    assert ((probs.float().sum(1) - 1).abs() > 1e-3).any()  # rounding alone breaks 1e-3
    calibration_error(probs, labels)
    with pytest.raises(ValueError, match="sum to 1"):
        calibration_error(torch.full((2, 4), 0.25).bfloat16() * 1.05, torch.zeros(2, dtype=LONG))


def test_validate_args_false_skips_value_checks_only():
    logits = torch.randn(8, 4)
    CalibrationError(validate_args=False).update(logits.softmax(1), torch.zeros(8, dtype=LONG))
    with pytest.raises(ValueError, match="2-D"):
        CalibrationError(validate_args=False).update(logits[0], torch.zeros(8, dtype=LONG))


# --------------------------------------------------------------------------------------------
# Metric classes: exact over several updates


def _metric_cases():
    cases = []
    for binning in BINNINGS:
        for norm in NORMS:
            cases.append(
                (
                    lambda b=binning, n=norm: CalibrationError(n_bins=10, binning=b, norm=n),
                    lambda p, y, b=binning, n=norm: calibration_error(p, y, 10, b, n),
                )
            )
    for norm in NORMS:
        cases.append(
            (
                lambda n=norm: ClasswiseCalibrationError(4, n_bins=10, norm=n),
                lambda p, y, n=norm: classwise_calibration_error(p, y, 10, n),
            )
        )
    for top in (False, True):
        cases.append(
            (lambda t=top: BrierScore(top_label=t), lambda p, y, t=top: brier_score(p, y, t))
        )
    cases.append((NegativeLogLikelihood, negative_log_likelihood))
    cases.append((CorrectnessAUROC, correctness_auroc))
    return cases


@pytest.mark.parametrize("make,fn", _metric_cases())
def test_metric_equals_functional_over_updates(make, fn):
    probs, labels = mixed_data(3)
    metric = make()
    assert metric.full_state_update is False and metric.is_differentiable is False
    for lo, hi in [(0, 17), (17, 17), (17, 120), (120, 121), (121, 240)]:  # one empty batch
        metric.update(probs[lo:hi].float(), labels[lo:hi])
    torch.testing.assert_close(metric.compute(), fn(probs.float(), labels), **TOL)
    # forward() returns the batch value and accumulates.
    metric.reset()
    batch = metric(probs[:100], labels[:100])
    torch.testing.assert_close(batch, fn(probs[:100], labels[:100]), **TOL)
    metric(probs[100:], labels[100:])
    torch.testing.assert_close(metric.compute(), fn(probs, labels), **TOL)


@pytest.mark.parametrize("make,fn", _metric_cases())
def test_metric_without_samples_warns_and_returns_nan(make, fn):
    metric = make()
    metric.update(torch.zeros(0, 4), torch.zeros(0, dtype=LONG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = metric.compute()
    assert math.isnan(value.item())
    assert any(issubclass(w.category, UserWarning) for w in caught)


def test_uniform_state_is_per_bin_sums_and_survives_a_precision_cast():
    probs, labels = random_probs(500, 10, seed=10, dtype=torch.float32)
    metric = CalibrationError(n_bins=15)
    states = {name: getattr(metric, name) for name in metric._defaults}
    assert {k: tuple(v.shape) for k, v in states.items()} == {
        "count": (15,),
        "sum_confidence": (15,),
        "sum_correct": (15,),
    }
    # What Lightning's "bf16-true" precision does to a module at setup.
    metric = metric.to(torch.bfloat16)
    metric.update(probs[:200], labels[:200])
    metric.update(probs[200:], labels[200:])
    assert metric.sum_confidence.dtype == torch.float64
    torch.testing.assert_close(metric.compute(), calibration_error(probs, labels), **TOL)


# --------------------------------------------------------------------------------------------
# Two real processes (gloo): each rank updates with its own shard; compute() syncs.

WORLD = 2


def _ddp_metrics():
    return {
        "ece_uniform": CalibrationError(n_bins=12),
        "ece_quantile": CalibrationError(n_bins=12, binning="quantile"),
        "mce_quantile": CalibrationError(n_bins=12, binning="quantile", norm="max"),
        "auroc": CorrectnessAUROC(),
        "classwise": ClasswiseCalibrationError(4, n_bins=12),
        "brier": BrierScore(),
        "nll": NegativeLogLikelihood(),
    }


def _ddp_worker(rank: int) -> dict[tuple[str, str], Tensor]:
    probs, labels = mixed_data(11)
    out = {}
    # Uneven shards, two updates each; then a run where rank 1 never sees a sample.
    for scenario, cut in [("uneven", 97), ("rank1_empty", len(labels))]:
        lo, hi = (0, cut) if rank == 0 else (cut, len(labels))
        mid = (lo + hi) // 2
        for name, metric in _ddp_metrics().items():
            if mid > lo:
                metric.update(probs[lo:mid], labels[lo:mid])
            if hi > mid:
                metric.update(probs[mid:hi], labels[mid:hi])
            out[scenario, name] = metric.compute()
    return out


def test_ddp_synced_compute_equals_single_process():
    results = run_gloo(_ddp_worker, WORLD)
    probs, labels = mixed_data(11)
    for name, metric in _ddp_metrics().items():
        metric.update(probs, labels)
        want = metric.compute()
        for rank in range(WORLD):
            for scenario in ("uneven", "rank1_empty"):
                got = results[rank][scenario, name]
                torch.testing.assert_close(got, want, **TOL, msg=f"{scenario} {name} rank {rank}")


# --------------------------------------------------------------------------------------------
# Reliability diagram and import hygiene


def test_reliability_diagram_returns_figure_and_saves_png(tmp_path):
    from matplotlib.figure import Figure

    probs, labels = random_probs(400, 10, seed=12, dtype=torch.float32)
    fig = reliability_diagram(probs, labels, n_bins=10, title="toy")
    assert isinstance(fig, Figure)
    main_ax = fig.axes[0]
    assert main_ax.get_title() == "toy"
    ece = calibration_error(probs, labels, n_bins=10).item()
    legend = [t.get_text() for t in main_ax.get_legend().get_texts()]
    assert any(f"{100 * ece:.2f}%" in t and "N = 400" in t for t in legend)
    path = tmp_path / "reliability.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Into a user's axes.
    user_fig = Figure()
    ax = user_fig.add_subplot()
    assert reliability_diagram(probs, labels, ax=ax) is user_fig
    user_fig.savefig(tmp_path / "into_ax.png")
    assert (tmp_path / "into_ax.png").stat().st_size > 0


def test_calibration_collection_equals_the_functions():
    from lightning_losses.metrics import calibration_collection

    probs, labels = mixed_data(5)
    probs = probs.float()
    collection = calibration_collection(4, prefix="val/")
    for lo, hi in [(0, 50), (50, 51), (51, 240)]:
        collection.update(probs[lo:hi], labels[lo:hi])
    got = collection.compute()
    want = {
        "val/ece": calibration_error(probs, labels),
        "val/ece25": calibration_error(probs, labels, n_bins=25),
        "val/adaptive_ece": calibration_error(probs, labels, binning="quantile"),
        "val/classwise_ece": classwise_calibration_error(probs, labels),
        "val/nll": negative_log_likelihood(probs, labels),
        "val/brier": brier_score(probs, labels),
        "val/top_label_brier": brier_score(probs, labels, top_label=True),
        "val/auroc": correctness_auroc(probs, labels),
    }
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TOL, msg=key)
