"""Orthogonal Projection Loss against a slow float64 reference, on edge cases and across ranks."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor
from torch_fakes import clustered_features, run_gloo

from lightning_losses.losses import (
    OrthogonalProjectionLoss,
    _opl_function,
    all_gather_rows,
    orthogonal_projection_loss,
    pair_sums,
)
from lightning_losses.losses._opl_function import (
    NORM_EPS,
    ClassPairSums,
    class_pair_sums,
    norms_and_class_sums,
)

MODES = ["none", "mean", "pair"]


def reference_opl(features, labels, gamma=0.5, abs_mode="none", eps=1e-6):
    """The authors' definition, pair by pair, in float64 Python loops."""
    f = features.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    pos = neg = 0.0
    n_pos = n_neg = 0
    b = f.shape[0]
    for i in range(b):
        for j in range(b):
            cos = float(f[i] @ f[j])
            if labels[i] == labels[j]:
                if i != j:
                    pos += cos
                    n_pos += 1
            else:
                neg += abs(cos) if abs_mode == "pair" else cos
                n_neg += 1
    s = pos / (n_pos + eps)
    d = neg / (n_neg + eps)
    if abs_mode == "mean":
        d = abs(d)
    return (1 - s) + gamma * d, s, d


def gram_opl(features, labels, gamma=0.5, eps=1e-6):
    """The authors' Gram-matrix form (O(B^2) memory), vectorised."""
    f = torch.nn.functional.normalize(features, dim=1)
    gram = f @ f.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos_mask = (same & ~eye).to(f.dtype)
    neg_mask = (~same).to(f.dtype)
    s = (gram * pos_mask).sum() / (pos_mask.sum() + eps)
    d = (gram * neg_mask).sum() / (neg_mask.sum() + eps)
    return (1 - s) + gamma * d


@pytest.mark.parametrize("abs_mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(abs_mode, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(23, 7, generator=g, dtype=torch.float64)  # signed: modes differ
    labels = torch.randint(0, 5, (23,), generator=g)
    out = orthogonal_projection_loss(features, labels, gamma=0.7, abs_mode=abs_mode)
    loss, s, d = reference_opl(features, labels, gamma=0.7, abs_mode=abs_mode)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss.item(), loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.pos_mean.item(), s, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.neg_mean.item(), d, rtol=0, atol=1e-12)


def test_abs_modes_differ_on_signed_features_and_agree_on_nonnegative():
    # Classes 0 and 2 around c, class 1 around -c: negative cosines near -1, +1 and -1.
    features, labels = clustered_features(6, 1, 5, spread=0.3, seed=3)
    features = torch.cat([features, -features, features.flip(0)])
    labels = torch.cat([labels, labels + 1, labels + 2])
    by_mode = {m: orthogonal_projection_loss(features, labels, abs_mode=m) for m in MODES}
    assert by_mode["none"].neg_mean < -0.2
    assert by_mode["mean"].neg_mean == pytest.approx(-by_mode["none"].neg_mean.item())
    assert by_mode["pair"].neg_mean > by_mode["mean"].neg_mean
    relu = features.relu()
    values = [orthogonal_projection_loss(relu, labels, abs_mode=m).loss for m in MODES]
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], values[2])


@pytest.mark.parametrize("abs_mode", MODES)
def test_degenerate_batches(abs_mode):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, generator=g, dtype=torch.float64)
    gamma = 0.5

    # Every label distinct: no positive pair, s = 0, loss = 1 + gamma * d.
    out = orthogonal_projection_loss(features, torch.arange(6), gamma, abs_mode)
    _, _, d_ref = reference_opl(features, torch.arange(6), gamma, abs_mode)
    assert out.pos_mean.item() == 0.0
    assert out.loss.item() == pytest.approx(1 + gamma * d_ref, abs=1e-12)

    # One class only: no negative pair, d = 0, loss = 1 - s.
    one = torch.zeros(6, dtype=torch.long)
    out = orthogonal_projection_loss(features, one, gamma, abs_mode)
    _, s_ref, _ = reference_opl(features, one, gamma, abs_mode)
    assert out.neg_mean.item() == 0.0
    assert out.loss.item() == pytest.approx(1 - s_ref, abs=1e-12)

    # A singleton class adds negatives but no positive pair.
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    out = orthogonal_projection_loss(features, labels, gamma, abs_mode)
    ref = reference_opl(features, labels, gamma, abs_mode)
    assert out.loss.item() == pytest.approx(ref[0], abs=1e-12)

    # B = 1: loss 1, exactly zero gradient.
    x = features[:1].clone().requires_grad_(True)
    out = orthogonal_projection_loss(x, torch.tensor([3]), gamma, abs_mode)
    out.loss.backward()
    assert out.loss.item() == 1.0
    assert torch.count_nonzero(x.grad) == 0


def test_degenerate_float32_exact():
    """The O(B D) form must not turn rounding into s or d when there are no pairs."""
    features = torch.randn(300, 64) * 100
    distinct = orthogonal_projection_loss(features, torch.arange(300))
    assert distinct.pos_mean.item() == 0.0
    single = orthogonal_projection_loss(features, torch.zeros(300, dtype=torch.long))
    assert single.neg_mean.item() == 0.0
    assert torch.isfinite(distinct.loss) and torch.isfinite(single.loss)


def test_zero_feature_row_gives_no_nan():
    features = torch.randn(4, 3, dtype=torch.float64)
    features[1] = 0.0  # a dead post-ReLU feature vector
    out = orthogonal_projection_loss(features, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(reference_opl(features, [0, 0, 1, 1])[0], abs=1e-12)


@pytest.mark.parametrize("abs_mode", MODES)
def test_gradcheck(abs_mode):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])

    def fn(x):
        return orthogonal_projection_loss(x, labels, 0.9, abs_mode).loss

    assert torch.autograd.gradcheck(fn, (features,))


def test_permutation_and_scale_invariance():
    features, labels = clustered_features(5, 4, 6, seed=2)
    base = orthogonal_projection_loss(features, labels).loss
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    permuted = orthogonal_projection_loss(features[perm], labels[perm]).loss
    scales = torch.rand(len(labels), 1, dtype=torch.float64) * 10 + 0.1
    scaled = orthogonal_projection_loss(features * scales, labels).loss
    relabelled = orthogonal_projection_loss(features, labels * 7 + 3).loss
    torch.testing.assert_close(permuted, base)
    torch.testing.assert_close(scaled, base)
    torch.testing.assert_close(relabelled, base)


@pytest.mark.parametrize("abs_mode", MODES)
def test_direct_and_renumbered_labels_agree(abs_mode):
    # Labels below B index the class sums directly (absent classes count 0); a label >= B
    # renumbers through torch.unique. Same loss, parts and gradient either way, any int dtype.
    g = torch.Generator().manual_seed(5)
    features = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 9, 9, 9, 17] * 5 + [17, 30, 30, 0, 12])  # 1, 2, 4, ... gaps
    variants = [labels, labels * 1000 + 5, labels.to(torch.int32), labels.to(torch.uint8)]
    outs, grads = [], []
    for variant in variants:
        x = features.clone().requires_grad_()
        out = orthogonal_projection_loss(x, variant, 0.6, abs_mode)
        (out.loss + 0.4 * out.pos_mean).backward()
        outs.append(torch.stack(tuple(out)).detach())
        grads.append(x.grad)
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=1e-13)
    ref = reference_opl(features, labels.tolist(), 0.6, abs_mode)
    torch.testing.assert_close(outs[0], torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_class_sum_form_agrees_with_gram_form(dtype, atol):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(512, 64, generator=g).relu().to(dtype)
    labels = torch.randint(0, 10, (512,), generator=g)
    fast = orthogonal_projection_loss(features, labels).loss
    torch.testing.assert_close(fast, gram_opl(features, labels), rtol=0, atol=atol)


def test_gradients_agree_with_gram_form():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 4, (40,), generator=g)
    orthogonal_projection_loss(a, labels).loss.backward()
    gram_opl(b, labels).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(dtype):
    features, labels = clustered_features(16, 4, 32, seed=6)
    low = features.to(dtype)
    out = orthogonal_projection_loss(low, labels)
    assert out.loss.dtype == torch.float32
    exact = orthogonal_projection_loss(low.double(), labels).loss  # same rounded inputs
    torch.testing.assert_close(out.loss.double(), exact, rtol=0, atol=1e-6)


def test_bf16_autocast_is_float32_accurate():
    features, labels = clustered_features(16, 4, 32, seed=7)
    x = features.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orthogonal_projection_loss(x * 1.0, labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(
        out.loss.double(), orthogonal_projection_loss(features, labels).loss, rtol=0, atol=1e-6
    )
    out.loss.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# The closed-form Function against the autograd class-sum path it replaced


def autograd_opl(features, labels, gamma=0.5, abs_mode="none", eps=1e-6):
    """The previous implementation: F.normalize and the class sums through autograd."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type="cpu", enabled=False):
        f = torch.nn.functional.normalize(features.to(dtype), dim=1)
        pos_sum, neg_sum, pos_count, neg_count = pair_sums(f, labels)
        pos_mean = torch.where(pos_count > 0, pos_sum / (pos_count + eps), 0.0)
        neg_mean = torch.where(neg_count > 0, neg_sum / (neg_count + eps), 0.0)
        if abs_mode == "mean":
            neg_mean = neg_mean.abs()
        return (1.0 - pos_mean) + gamma * neg_mean, pos_mean, neg_mean


def _sums(features, labels, dtype=None):
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    dtype = dtype or torch.promote_types(features.dtype, torch.float32)
    return class_pair_sums(features, inverse, counts, dtype)[:2]


LABEL_SETS = {
    "mixed with singletons": torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 7, 7]),
    "one class": torch.zeros(11, dtype=torch.long),
    "all distinct": torch.arange(11),
    "two classes": torch.tensor([1, 0] * 5 + [1]),
}


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_function_gradcheck(name):
    labels = LABEL_SETS[name]
    g = torch.Generator().manual_seed(21)
    scales = torch.logspace(-3, 3, len(labels), dtype=torch.float64)[:, None]
    x = (torch.randn(len(labels), 5, generator=g, dtype=torch.float64) * scales).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _sums(t, labels), (x,))


@pytest.mark.parametrize("abs_mode", ["none", "mean"])
@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_loss_gradcheck_all_outputs(abs_mode, name):
    labels = LABEL_SETS[name]
    g = torch.Generator().manual_seed(22)
    x = torch.randn(len(labels), 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: tuple(orthogonal_projection_loss(t, labels, 0.8, abs_mode)), (x,)
    )


@pytest.mark.parametrize("chunk", [1, 7, 64, 2**18])
def test_norms_and_class_sums_any_chunk(chunk, monkeypatch):
    monkeypatch.setattr(_opl_function, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,), generator=g)
    _, inverse, _ = torch.unique(labels, return_inverse=True, return_counts=True)
    norms, sums = norms_and_class_sums(x, inverse, int(inverse.max()) + 1)
    z = torch.nn.functional.normalize(x, dim=1)
    want = torch.stack([z[labels == c].sum(0) for c in labels.unique()])
    torch.testing.assert_close(norms, x.norm(dim=1), rtol=0, atol=1e-14)
    torch.testing.assert_close(sums, want, rtol=0, atol=1e-13)


def test_work_buffer_is_reused_per_thread_and_dtype():
    f = torch.randn(10, 8)
    first, again = _opl_function.work_buffer(f, 10), _opl_function.work_buffer(f, 4)
    assert first.shape == (10, 8) and again.shape == (4, 8) and first.dtype == f.dtype
    assert again.data_ptr() == first.data_ptr()  # one flat buffer, reused
    double = _opl_function.work_buffer(f.double(), 10)
    assert double.dtype == torch.float64 and double.data_ptr() != first.data_ptr()
    # More than CHUNK_ELEMENTS: a fresh buffer, nothing kept.
    big = torch.empty(1, _opl_function.CHUNK_ELEMENTS + 1)
    assert _opl_function.work_buffer(big, 1).data_ptr() != first.data_ptr()
    # Another thread has its own buffer, and losses computed in threads at once are right.
    other = []
    thread = threading.Thread(target=lambda: other.append(_opl_function.work_buffer(f, 10)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != first.data_ptr()
    g = torch.Generator().manual_seed(8)
    batches = [
        (torch.randn(50, 7, generator=g), torch.randint(0, 5, (50,), generator=g)) for _ in range(4)
    ]
    want = [orthogonal_projection_loss(x, y).loss for x, y in batches]
    got = [None] * len(batches)

    def run(i):
        for _ in range(20):
            got[i] = orthogonal_projection_loss(*batches[i]).loss

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for value, expected in zip(got, want):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_passes_equal_autograd_path(chunk, dtype, monkeypatch):
    # Chunks of 1 row, of rows that do not divide B, and of several rows.
    monkeypatch.setattr(_opl_function, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(25)
    features = torch.randn(23, 5, generator=g, dtype=torch.float64).to(dtype)
    features[4] = 0.0
    labels = torch.randint(0, 4, (23,), generator=g)
    keep = torch.arange(23) != 4
    a = features.clone().requires_grad_()
    b = features.clone().requires_grad_()
    out = orthogonal_projection_loss(a, labels)
    ref = autograd_opl(b, labels)
    (out.loss - out.neg_mean).backward()
    (ref[0] - ref[2]).backward()
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.loss, ref[0], rtol=0, atol=atol)
    torch.testing.assert_close(a.grad[keep], b.grad[keep], rtol=1e-2, atol=atol)
    assert torch.count_nonzero(a.grad[4]) == 0


def _compare_with_autograd(features, labels, abs_mode, atol, rtol=0.0):
    a = features.detach().clone().requires_grad_()
    b = features.detach().clone().requires_grad_()
    new = orthogonal_projection_loss(a, labels, 0.7, abs_mode)
    old = autograd_opl(b, labels, 0.7, abs_mode)
    for got, want in zip(new, old):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    # Weights on all three outputs, so that every upstream gradient reaches the Function.
    (new.loss + 0.3 * new.pos_mean - 1.7 * new.neg_mean).backward()
    (old[0] + 0.3 * old[1] - 1.7 * old[2]).backward()
    assert a.grad.dtype == features.dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    return a.grad


@pytest.mark.parametrize("abs_mode", ["none", "mean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_function_equals_autograd_path_float64(abs_mode, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(300, 24, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 12, (300,), generator=g)
    _compare_with_autograd(features, labels, abs_mode, atol=1e-12)


@pytest.mark.parametrize("abs_mode", ["none", "mean"])
def test_function_equals_autograd_path_float32(abs_mode):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1000, 64, generator=g).relu() * 30
    labels = torch.randint(0, 50, (1000,), generator=g)
    _compare_with_autograd(features, labels, abs_mode, atol=2e-6, rtol=1e-4)


def test_function_equals_autograd_path_bf16_input_and_autocast():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(200, 32, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 8, (200,), generator=g)
    grad = _compare_with_autograd(features, labels, "none", atol=1e-5, rtol=1e-2)
    assert grad.dtype == torch.bfloat16
    # Under autocast the float32 features come back with a float32 gradient.
    x = features.float().requires_grad_()
    y = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orthogonal_projection_loss(x * 1.0, labels)
        ref = autograd_opl(y * 1.0, labels)
    torch.testing.assert_close(out.loss, ref[0], rtol=0, atol=1e-6)
    out.loss.backward()
    ref[0].backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_function_equals_autograd_path_on_degenerate_labels(name):
    labels = LABEL_SETS[name]
    g = torch.Generator().manual_seed(5)
    features = torch.randn(len(labels), 3, generator=g, dtype=torch.float64)
    _compare_with_autograd(features, labels, "none", atol=1e-12)


def test_function_non_contiguous_input():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(16, 40, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    _compare_with_autograd(base.T, labels, "none", atol=1e-12)


def test_b1_gives_loss_one_and_zero_gradient_in_function():
    x = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    out = orthogonal_projection_loss(x, torch.tensor([2]), abs_mode="mean")
    (out.loss + out.pos_mean + out.neg_mean).backward()
    assert out.loss.item() == 1.0
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("abs_mode", MODES)
def test_zero_rows_get_zero_gradient_and_others_match(abs_mode):
    g = torch.Generator().manual_seed(7)
    features = torch.randn(10, 4, generator=g, dtype=torch.float64)
    features[[1, 6]] = 0.0  # dead feature vectors, one per class
    features[8] = NORM_EPS / 4  # below the normalisation floor: also "no direction"
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    x = features.clone().requires_grad_()
    out = orthogonal_projection_loss(x, labels, 0.5, abs_mode)
    out.loss.backward()
    # Values: a zero row has cosine 0 with everything (the reference loop's convention).
    ref = reference_opl(features, labels, 0.5, abs_mode)
    assert out.loss.item() == pytest.approx(ref[0], abs=1e-12)
    assert torch.count_nonzero(x.grad[[1, 6, 8]]) == 0
    # The other rows: finite differences of the loss through those rows only.
    live = torch.tensor([i not in (1, 6, 8) for i in range(10)])

    def through_live(rows):
        full = features.clone()
        full[live] = rows
        return orthogonal_projection_loss(full, labels, 0.5, abs_mode).loss

    rows = features[live].clone().requires_grad_()
    assert torch.autograd.gradcheck(through_live, (rows,))
    torch.testing.assert_close(x.grad[live], torch.autograd.grad(through_live(rows), rows)[0])
    # The autograd path through F.normalize gives a zero row about 1e12 times the others'.
    old = features.clone().requires_grad_()
    autograd_opl(old, labels, 0.5, "none")[0].backward()
    assert old.grad[1].abs().max() > 1e6


@pytest.mark.parametrize("name", ["mixed with singletons", "one class"])
def test_function_double_backward(name):
    labels = LABEL_SETS[name]
    g = torch.Generator().manual_seed(8)
    x = torch.randn(len(labels), 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: _sums(t, labels), (x,))
    assert torch.autograd.gradgradcheck(
        lambda t: tuple(orthogonal_projection_loss(t, labels, 0.6, "mean")), (x,)
    )


def test_no_gradient_requested_returns_values():
    x = torch.randn(6, 3)
    with torch.no_grad():
        out = orthogonal_projection_loss(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not out.loss.requires_grad
    assert ClassPairSums is not None


@pytest.mark.parametrize(
    "features,labels,kwargs,match",
    [
        (
            torch.randn(4),
            torch.zeros(4, dtype=torch.long),
            {},
            "features must be a tensor of shape",
        ),
        (
            torch.randn(4, 3, 2),
            torch.zeros(4, dtype=torch.long),
            {},
            "features must be a tensor of shape",
        ),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, "floating"),
        (
            torch.randn(4, 3),
            torch.zeros(5, dtype=torch.long),
            {},
            "labels must have one entry per row",
        ),
        (torch.randn(4, 3), torch.zeros(4), {}, "labels must be an integer"),
        (
            torch.randn(4, 3),
            torch.zeros(4, 2, dtype=torch.long),
            {},
            "labels must be a tensor of shape",
        ),
        (torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, dtype=torch.long), {}, "NaN or inf"),
        (torch.tensor([[float("inf"), 1.0]]), torch.zeros(1, dtype=torch.long), {}, "NaN or inf"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"abs_mode": "abs"}, "abs_mode"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"gamma": -1.0}, "gamma"),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), {}, "empty batch"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"gamma": float("nan")}, "gamma"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"gamma": float("inf")}, "gamma"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"eps": -1e-6}, "eps"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"eps": 0.0}, "eps"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"eps": float("nan")}, "eps"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), {"eps": float("inf")}, "eps"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), {}, r"at least one column"),
        (torch.randn(3, 2), torch.tensor([-100, 0, 1]), {}, "labels must be class indices >= 0"),
        (torch.randn(3, 2), torch.tensor([-1, -1, 0]), {"abs_mode": "pair"}, ">= 0"),
        (torch.tensor([[1e30, 1.0], [1.0, 2.0]]), torch.tensor([0, 1]), {}, "overflows"),
        (
            torch.tensor([[1e30, 1.0], [1.0, 2.0]]),
            torch.tensor([0, 1]),
            {"abs_mode": "pair"},
            "overflows",
        ),
        (
            torch.tensor([[float("nan"), 1.0]] * 2),
            torch.tensor([0, 1]),
            {"abs_mode": "pair"},
            "NaN",
        ),
        (torch.tensor([[1.0, 1.0], [float("-inf"), 0.0]]), torch.tensor([0, 0]), {}, "NaN or inf"),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long, device="meta"),
            {},
            "labels must be on the device of features",
        ),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.bool), {}, "integer"),
        (torch.randn(4, 3).to_sparse(), torch.zeros(4, dtype=torch.long), {}, "dense"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long).to_sparse(), {}, "dense"),
        (
            torch.randn(4, 3, dtype=torch.complex64),
            torch.zeros(4, dtype=torch.long),
            {},
            "floating",
        ),
        (
            torch.randn(4, 3).numpy(),
            torch.zeros(4, dtype=torch.long),
            {},
            "features must be a tensor",
        ),
        (torch.randn(4, 3), [0, 0, 1, 1], {}, "labels must be a tensor"),
        (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), {}, r"shape \(B,\)"),
        (
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"gamma": torch.tensor(0.5)},
            "gamma",
        ),
    ],
)
def test_bad_input_raises_value_error(features, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthogonal_projection_loss(features, labels, **kwargs)


def test_large_finite_features_in_float64_are_fine():
    # Rows that overflow float32's squared norm are exact in float64.
    x = torch.tensor([[1e30, 1e30], [2e30, 1e30], [-1e30, 3e30]], dtype=torch.float64)
    out = orthogonal_projection_loss(x, torch.tensor([0, 0, 1]))
    ref = reference_opl(x, [0, 0, 1])
    assert out.loss.item() == pytest.approx(ref[0], abs=1e-12)


def test_module_checks_device_before_gathering():
    module = OrthogonalProjectionLoss(gather_distributed=True)
    with pytest.raises(ValueError, match="device"):
        module(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))


def test_module_matches_function_and_validates_options():
    features, labels = clustered_features(4, 3, 5, seed=8)
    module = OrthogonalProjectionLoss(gamma=2.0, abs_mode="pair")
    expected = orthogonal_projection_loss(features, labels, 2.0, "pair")
    for got, want in zip(module(features, labels), expected):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="abs_mode"):
        OrthogonalProjectionLoss(abs_mode="both")
    with pytest.raises(ValueError, match="gamma"):
        OrthogonalProjectionLoss(gamma=-0.1)
    for gamma in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma"):
            OrthogonalProjectionLoss(gamma=gamma)
    for eps in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            OrthogonalProjectionLoss(eps=eps)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert all_gather_rows(x) is x


# --------------------------------------------------------------------------------------------
# Two real processes (gloo): the gathered loss equals the single-process loss on the global
# batch, and gradients after DDP's average equal single-process gradients. One pair of processes
# for every case (starting the processes is most of the cost).

WORLD = 2
# (abs_mode, rows per rank): uneven on purpose (the gather must pad and trim), and a rank with
# no rows at all (only the gathered batch must be non-empty).
CASES = [("none", (5, 3)), ("mean", (5, 3)), ("pair", (5, 3)), ("none", (8, 0))]


def _global_batch():
    g = torch.Generator().manual_seed(11)
    features = torch.randn(8, 6, generator=g, dtype=torch.float64)
    features[2] = 0.0  # a dead row on rank 0: zero gradient everywhere
    labels = torch.randint(0, 3, (8,), generator=g)
    return features, labels


def _ddp_worker(rank: int) -> list[tuple[Tensor, Tensor]]:
    features, labels = _global_batch()
    results = []
    for abs_mode, sizes in CASES:
        start = sum(sizes[:rank])
        local = features[start : start + sizes[rank]].clone().requires_grad_(True)
        loss_fn = OrthogonalProjectionLoss(gamma=0.5, abs_mode=abs_mode, gather_distributed=True)
        out = loss_fn(local, labels[start : start + sizes[rank]])
        out.loss.backward()
        # What DDP does to parameter gradients: the average over ranks of each rank's one.
        grad = torch.zeros_like(features)
        grad[start : start + sizes[rank]] = local.grad
        torch.distributed.all_reduce(grad)
        results.append((out.loss.detach(), grad / WORLD))
    return results


def test_gathered_loss_and_gradient_equal_single_process():
    results = run_gloo(_ddp_worker, WORLD)
    features, labels = _global_batch()
    for index, (abs_mode, _) in enumerate(CASES):
        x = features.clone().requires_grad_(True)
        single = orthogonal_projection_loss(x, labels, 0.5, abs_mode).loss
        single.backward()
        assert torch.count_nonzero(x.grad[2]) == 0
        for rank in range(WORLD):
            loss, grad = results[rank][index]
            torch.testing.assert_close(loss, single.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-12)
