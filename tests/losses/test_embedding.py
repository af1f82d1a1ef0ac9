"""MMD against an explicit float64 double loop, its estimators and gradients, and EmbeddingLoss."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_losses.checks import CountHostReads
from lightning_losses.losses import EmbeddingLoss, EmbeddingLossOutput, mmd2
from lightning_losses.nets import RandomEmbedderBank

MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _sq_dist(a, b) -> float:
    return sum((float(a[k]) - float(b[k])) ** 2 for k in range(len(a)))


def reference_median_bandwidth(x, y) -> float:
    """Lower median of ||z_i - z_j||^2 over the pairs i < j of the pooled sample z = [x; y]."""
    z = [row for row in x.double()] + [row for row in y.double()]
    values = sorted(_sq_dist(z[i], z[j]) for i in range(len(z)) for j in range(i + 1, len(z)))
    return values[(len(values) - 1) // 2]


def reference_mmd2(x, y, kernel, bandwidth=None, multipliers=MULTIPLIERS, unbiased=True) -> float:
    """The estimators' definitions, pair by pair, in float64 Python loops."""
    x, y = x.double(), y.double()
    if kernel == "gaussian":
        h = reference_median_bandwidth(x, y) if bandwidth is None else bandwidth

        def k(a, b):
            d2 = _sq_dist(a, b)
            return sum(math.exp(-d2 / (s * h)) for s in multipliers)
    else:

        def k(a, b):
            return sum(float(a[t]) * float(b[t]) for t in range(len(a)))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j or not unbiased)
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j or not unbiased)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    if unbiased:
        return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2 * xy / (m * n)
    return xx / m**2 + yy / n**2 - 2 * xy / (m * n)


def _samples(m=7, n=5, d=3, shift=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=dtype)
    y = torch.randn(n, d, generator=g, dtype=dtype) + shift
    return x, y


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("bandwidth", [None, 3.0])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_mmd2_matches_float64_loop_reference(kernel, bandwidth, unbiased):
    for seed in range(2):
        x, y = _samples(seed=seed)
        expected = reference_mmd2(x, y, kernel, bandwidth, unbiased=unbiased)
        got64 = mmd2(x, y, kernel, bandwidth=bandwidth, unbiased=unbiased)
        assert got64.dtype == torch.float64
        assert float(got64) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        got32 = mmd2(x.float(), y.float(), kernel, bandwidth=bandwidth, unbiased=unbiased)
        assert got32.dtype == torch.float32
        assert float(got32) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_median_heuristic_uses_off_diagonal_pairs_of_pooled_sample():
    # Pooled distances: the median over i < j pairs differs from a median that counts the zero
    # diagonal, from one over x-y pairs only, and from the midpoint of the two middle values.
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[7.0], [15.0]], dtype=torch.float64)
    h = reference_median_bandwidth(x, y)
    assert h == 36.0  # pair distances^2: 1 4 9 16 36 49 64 144 196 225 -> lower median 36
    got = mmd2(x, y, "gaussian", unbiased=False)
    assert float(got) == pytest.approx(reference_mmd2(x, y, "gaussian", unbiased=False), rel=1e-12)
    assert float(got) == pytest.approx(
        float(mmd2(x, y, "gaussian", bandwidth=36.0, unbiased=False)), rel=1e-12
    )
    assert float(got) != pytest.approx(
        float(mmd2(x, y, "gaussian", bandwidth=42.5, unbiased=False)), rel=1e-6
    )


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_mmd2_is_symmetric(kernel, unbiased):
    x, y = _samples(m=9, n=6, d=4, dtype=torch.float32)
    assert torch.allclose(
        mmd2(x, y, kernel, unbiased=unbiased), mmd2(y, x, kernel, unbiased=unbiased)
    )


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_biased_mmd2_of_a_sample_with_itself_is_zero(kernel):
    x, _ = _samples(m=10, d=5, dtype=torch.float32)
    assert abs(float(mmd2(x, x.clone(), kernel, unbiased=False))) < 1e-5


def test_linear_biased_mmd2_is_squared_distance_of_means():
    x, y = _samples(m=11, n=4, d=6, shift=1.5)
    expected = (x.mean(0) - y.mean(0)).pow(2).sum()
    assert torch.allclose(mmd2(x, y, "linear", unbiased=False), expected, rtol=1e-10)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_unbiased_estimate_is_zero_in_expectation_and_positive_under_shift(kernel):
    same, biased, shifted = [], [], []
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 4, generator=g)
        y = torch.randn(32, 4, generator=g)
        same.append(float(mmd2(x, y, kernel)))
        biased.append(float(mmd2(x, y, kernel, unbiased=False)))
        shifted.append(float(mmd2(x, y + 1.0, kernel)))
    mean_same = sum(same) / len(same)
    mean_biased = sum(biased) / len(biased)
    mean_shifted = sum(shifted) / len(shifted)
    # Standard errors here are ~0.004 (gaussian) and ~0.012 (linear); the V-statistic's bias is
    # ~0.18 and ~0.25; the shift gives ~1 and ~4.
    assert abs(mean_same) < 0.05
    assert mean_biased > 0.1
    assert mean_shifted > 0.5
    assert min(shifted) > 0


def test_mmd2_rejects_bad_inputs():
    x, y = _samples(dtype=torch.float32)
    with pytest.raises(ValueError, match="x has 1 rows"):
        mmd2(x[:1], y)
    with pytest.raises(ValueError, match="y has 1 rows"):
        mmd2(x, y[:1])
    assert torch.isfinite(mmd2(x[:1], y[:1], unbiased=False))  # the V-statistic accepts 1 row
    with pytest.raises(ValueError, match="x has 0 rows"):
        mmd2(x[:0], y, unbiased=False)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        mmd2(x.view(7, 3, 1), y)
    with pytest.raises(ValueError, match="same number of features"):
        mmd2(x, y[:, :2])
    with pytest.raises(ValueError, match="kernel"):
        mmd2(x, y, "laplace")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth_multipliers"):
        mmd2(x, y, bandwidth_multipliers=())
    with pytest.raises(ValueError, match="bandwidth_multipliers"):
        mmd2(x, y, bandwidth_multipliers=(1.0, -2.0))
    with pytest.raises(ValueError, match="floating-point"):
        mmd2(x.long(), y)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        mmd2(bad, y)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_gradients_are_finite_at_identical_points(kernel):
    base = torch.randn(4, 3)
    x = torch.cat([base, base]).requires_grad_()  # duplicated rows: distance 0 off the diagonal
    y = torch.cat([base, base]).clone().requires_grad_()
    value = mmd2(x, y, kernel)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # Every point identical: the median is 0 and the bandwidth floor keeps everything finite.
    same = torch.ones(5, 3, requires_grad=True)
    value = mmd2(same, torch.ones(4, 3), kernel)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(same.grad).all()


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_gradcheck_float64_fixed_bandwidth(kernel, unbiased):
    x, y = _samples(m=5, n=4, d=3)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: mmd2(a, b, kernel, bandwidth=2.0, unbiased=unbiased), (x, y)
    )


def test_mmd2_computes_in_at_least_float32():
    x, y = _samples(dtype=torch.float32)
    expected = mmd2(x, y)
    got = mmd2(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, mmd2(x.bfloat16().float(), y.bfloat16().float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = mmd2(x, y)
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, expected)


def _bank() -> RandomEmbedderBank:
    return RandomEmbedderBank(in_channels=1, num_networks=4, seed=0, width=4)


def _images(batch: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def test_embedding_loss_is_sum_of_per_feature_mmd():
    bank = _bank()
    loss_fn = EmbeddingLoss(bank)
    generated, real = _images(6, 0), _images(5, 1, shift=0.3)
    out = loss_fn(generated, real)
    assert isinstance(out, EmbeddingLossOutput)
    gen_f, real_f = bank(generated), bank(real)
    expected = torch.stack([mmd2(a, b) for a, b in zip(gen_f, real_f)])
    assert out.per_feature.shape == (len(bank.feature_dims),)
    assert torch.allclose(out.per_feature, expected)
    assert torch.allclose(out.loss, expected.sum())
    linear = EmbeddingLoss(bank, kernel="linear", unbiased=False)(generated, real)
    expected_linear = [(a.mean(0) - b.mean(0)).pow(2).sum() for a, b in zip(gen_f, real_f)]
    assert torch.allclose(linear.per_feature, torch.stack(expected_linear), atol=1e-6)


def test_embedding_loss_gradients_reach_generated_batch_only():
    bank = _bank()
    loss_fn = EmbeddingLoss(bank)
    generated = _images(6, 0).requires_grad_()
    real = _images(6, 1, shift=0.5).requires_grad_()
    out = loss_fn(generated, real)
    out.loss.backward()
    assert generated.grad is not None and torch.isfinite(generated.grad).all()
    assert generated.grad.abs().sum() > 0
    assert real.grad is None
    assert all(p.grad is None and not p.requires_grad for p in bank.parameters())
    # A plain module passed as a bank is frozen too, and kept in eval mode.
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.Dropout(0.5))
    plain_bank = _ListOf(plain)
    wrapped = EmbeddingLoss(plain_bank)
    wrapped.train()
    assert wrapped.training and not plain_bank.training and not plain[2].training
    wrapped(generated, real).loss.backward()
    assert all(p.grad is None for p in plain.parameters())


class _ListOf(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return [self.net(x)]


def test_embedding_loss_per_class_skips_small_classes():
    bank = _bank()
    loss_fn = EmbeddingLoss(bank, per_class=True)
    generated, real = _images(6, 0), _images(8, 1, shift=0.2)
    gen_labels = torch.tensor([0, 0, 0, 1, 2, 2])
    real_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = loss_fn(generated, real, gen_labels, real_labels)
    # Class 1 has 1 generated sample and class 3 none: only classes 0 and 2 count.
    gen_f, real_f = bank(generated), bank(real)
    expected = []
    for a, b in zip(gen_f, real_f):
        per_class = [mmd2(a[gen_labels == c], b[real_labels == c]) for c in (0, 2)]
        expected.append(torch.stack(per_class).mean())
    assert torch.allclose(out.per_feature, torch.stack(expected), atol=1e-6)
    unconditional = EmbeddingLoss(bank)(generated, real)
    assert not torch.allclose(out.loss, unconditional.loss)
    # No class with >= 2 samples on both sides: the unconditional MMD.
    fallback = loss_fn(generated, real, torch.arange(6), torch.arange(8))
    assert torch.allclose(fallback.per_feature, unconditional.per_feature)
    with pytest.raises(ValueError, match="per_class=True needs"):
        loss_fn(generated, real)


def test_embedding_loss_rejects_bad_inputs():
    loss_fn = EmbeddingLoss(_bank())
    good = _images(4, 0)
    with pytest.raises(ValueError, match="generated has 3 channels"):
        loss_fn(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="spatial size"):
        loss_fn(torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 4, 4))
    with pytest.raises(ValueError, match="same channels and size"):
        loss_fn(good, torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="real has batch size 1"):
        loss_fn(good, good[:1])
    with pytest.raises(ValueError, match=r"generated must be an image batch \(B, C, H, W\)"):
        loss_fn(good[0], good[0])  # one unbatched image: not a batch of 1-row images
    with pytest.raises(ValueError, match="generated and real must be on the same device"):
        loss_fn(good, good.to("meta"))
    with pytest.raises(ValueError, match="the images are on meta but the bank is on cpu"):
        loss_fn(good.to("meta"), good.to("meta"))
    bad = good.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"generated must hold finite values .* got NaN or inf"):
        loss_fn(bad, good)
    with pytest.raises(ValueError, match="real_labels must have 4 entries"):
        EmbeddingLoss(_bank(), per_class=True)(
            good, good, torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="kernel"):
        EmbeddingLoss(_bank(), kernel="cosine")


# ------------------------------------------------------------------------------------------------
# Host synchronisations: one read per call
# ------------------------------------------------------------------------------------------------


def _gen_real(batch: int = 8, seed: int = 0):
    return _images(batch, seed).requires_grad_(), _images(batch, seed + 1, shift=0.3)


def test_host_read_counter_sees_reads():
    x = torch.tensor([1.0, -2.0])
    with CountHostReads() as counter:
        bool(x.sum() > 0)
        x.tolist()
        x[x > 0]
        x.nonzero()
        x.to("cpu")
        x.sum() + 1  # no read
    assert counter.reads == ["__bool__", "tolist", "__getitem__[bool mask]", "nonzero", "to(cpu)"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kernel": "linear"},
        {"unbiased": False},
        {"bandwidth": 2.0},
        {"per_class": True},
        {"value_range": None},
    ],
)
def test_embedding_loss_reads_the_host_once_per_call(options):
    from lightning_losses.losses import _mmd_maps
    from lightning_losses.nets import embedders

    # The first call builds the cached constants (indices, weights) too: no read there either.
    for cache in (_mmd_maps._CACHE, embedders._PATCH_INDEX_CACHE, embedders._WINDOW_CACHE):
        cache.clear()
    loss_fn = EmbeddingLoss(_bank(), **options)
    generated, real = _gen_real()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with CountHostReads() as counter:
        out = loss_fn(generated, real, labels, labels.flip(0))
        out.loss.backward()
    assert counter.reads == ["tolist"]  # the one small tensor of flags
    assert torch.isfinite(out.loss)


def test_mmd2_reads_the_host_once():
    x, y = _samples(dtype=torch.float32)
    with CountHostReads() as counter:
        mmd2(x, y)
        mmd2(x, y, "linear")
    assert counter.reads == ["tolist", "tolist"]


# ------------------------------------------------------------------------------------------------
# Image range and finiteness of both batches, folded into that read
# ------------------------------------------------------------------------------------------------


def test_embedding_loss_rejects_unscaled_images():
    loss_fn = EmbeddingLoss(_bank())
    unit = _images(6, 0)
    pixels = (unit + 1) * 127.5  # [0, 255]
    with pytest.raises(
        ValueError,
        match=r"real must hold finite values in \[-1, 1\] \(the value_range, to within 0.001\).*"
        r"got values in \[\d",
    ):
        loss_fn(unit, pixels)
    with pytest.raises(ValueError, match=r"generated must hold finite values in \[-3, 3\]"):
        loss_fn(pixels, unit)
    # A one-step generator is not clipped: slightly outside [-1, 1] is fine, real data is not.
    overshoot = unit * 1.2
    assert torch.isfinite(loss_fn(overshoot, unit).loss)
    with pytest.raises(ValueError, match="real must hold finite values"):
        loss_fn(unit, overshoot)
    # Other data ranges: say so, or skip the check.
    assert torch.isfinite(EmbeddingLoss(_bank(), value_range=None)(pixels, pixels).loss)
    assert torch.isfinite(EmbeddingLoss(_bank(), value_range=(0, 255))(pixels, pixels).loss)
    for bad in [(1.0, -1.0), (0.0, float("inf")), "[-1, 1]", (1.0,)]:
        with pytest.raises(ValueError, match="value_range"):
            EmbeddingLoss(_bank(), value_range=bad)
    for bad in [-0.1, float("nan"), True]:
        with pytest.raises(ValueError, match="generated_margin"):
            EmbeddingLoss(_bank(), generated_margin=bad)


def test_unchecked_embedding_loss_defers_its_read_to_the_caller():
    """unchecked() is forward() without the read: the same loss, an unread 0-d flag, and
    raise_for() words the error forward() raises."""
    loss_fn = EmbeddingLoss(_bank())
    generated, real = _gen_real()
    expected = loss_fn(generated, real)
    with CountHostReads() as counter:
        output, ok = loss_fn.unchecked(generated, real)
        output.loss.backward()
    assert counter.reads == []
    assert ok.shape == () and ok.dtype == torch.bool and bool(ok)
    assert torch.allclose(output.per_feature, expected.per_feature, rtol=1e-6, atol=0)
    unit = _images(6, 0)
    pixels = (unit + 1) * 127.5
    output, ok = loss_fn.unchecked(unit, pixels)
    assert not bool(ok)
    with pytest.raises(ValueError, match=r"real must hold finite values in \[-1, 1\]"):
        loss_fn.raise_for(unit, pixels, output)
    nan = unit.clone()
    nan[0, 0, 0, 0] = float("nan")
    output, ok = EmbeddingLoss(_bank(), value_range=None).unchecked(nan, unit)
    assert not bool(ok)
    with pytest.raises(ValueError, match="generated contains NaN or inf"):
        EmbeddingLoss(_bank(), value_range=None).raise_for(nan, unit, output)


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), None])
@pytest.mark.parametrize("which", ["generated", "real"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_embedding_loss_rejects_non_finite_images(which, bad_value, value_range):
    loss_fn = EmbeddingLoss(_bank(), value_range=value_range)
    batches = {"generated": _images(6, 0), "real": _images(6, 1)}
    batches[which][2, 0, 3, 4] = bad_value
    pattern = f"{which} must hold finite values" if value_range else f"{which} contains NaN or inf"
    with pytest.raises(ValueError, match=pattern):
        loss_fn(batches["generated"], batches["real"])


def test_embedding_loss_reports_a_non_finite_result_of_finite_inputs():
    class Overflowing(torch.nn.Module):
        def forward(self, x):
            return [x.flatten(1) * 1e30, x.flatten(1)[:, :4]]  # squares overflow, then inf - inf

    loss_fn = EmbeddingLoss(Overflowing(), kernel="linear")
    with pytest.raises(ValueError, match=r"EL is not finite \(feature maps \[0\] of 2"):
        loss_fn(_images(6, 0), _images(6, 1, shift=0.5))


# ------------------------------------------------------------------------------------------------
# Features far from 1: no overflow, no underflow
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "magnitude"),
    [
        ("gaussian", 1e20),
        ("gaussian", 1e30),
        ("gaussian", 1e-25),
        ("linear", 1e15),
        ("linear", 1e-15),
    ],
)
def test_mmd2_of_features_far_from_one_matches_float64(kernel, magnitude):
    x, y = _samples(m=6, n=5, d=3)
    expected = reference_mmd2(x * magnitude, y * magnitude, kernel)
    got = mmd2((x * magnitude).float(), (y * magnitude).float(), kernel)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-4, abs=0.0)
    if kernel == "gaussian":  # scale-invariant: the value is that of the unscaled sample
        assert float(got) == pytest.approx(reference_mmd2(x, y, kernel), rel=1e-4)
    assert float(mmd2(x * magnitude, y * magnitude, kernel)) == pytest.approx(expected, rel=1e-9)


def test_mmd2_raises_when_the_value_itself_overflows():
    x, y = _samples(m=6, n=5, d=3)
    with pytest.raises(ValueError, match="past the range of torch.float32; pass float64"):
        mmd2((x * 1e20).float(), (y * 1e20).float(), "linear")  # the value is ~1e40
    expected = reference_mmd2(x * 1e20, y * 1e20, "linear")
    assert float(mmd2(x * 1e20, y * 1e20, "linear")) == pytest.approx(expected, rel=1e-9)


def test_mmd2_fixed_bandwidth_with_features_far_from_one_matches_float64():
    x, y = _samples(m=6, n=5, d=3)
    x[1] = x[0]  # a duplicated point: distance exactly 0, kernel exactly 5
    for scale, bandwidth in [(1e18, 3e36), (1e18, 3.0), (1e20, 1.0), (1e-15, 3e-30), (1e-3, 1e30)]:
        expected = reference_mmd2(x * scale, y * scale, "gaussian", bandwidth)
        got = mmd2((x * scale).float(), (y * scale).float(), bandwidth=bandwidth)
        assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-6), (scale, bandwidth)
    with pytest.raises(
        ValueError, match="bandwidth=3e[+]?40 is outside the range of torch.float32"
    ):
        mmd2(x.float(), y.float(), bandwidth=3e40)
    with pytest.raises(ValueError, match="outside the range of torch.float32"):
        mmd2(x.float(), y.float(), bandwidth=1e-50)
    assert torch.isfinite(mmd2(x, y, bandwidth=3e40))  # float64 holds it


def test_mmd2_gradients_of_huge_features_are_finite():
    x, y = _samples(m=6, n=5, d=3, dtype=torch.float32)
    big = (x * 1e20).requires_grad_()
    mmd2(big, y * 1e20).backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().max() > 0
    # d/dz of a scale-invariant value: the gradient at c z is the gradient at z divided by c.
    small = x.clone().requires_grad_()
    mmd2(small, y).backward()
    assert torch.allclose(big.grad * 1e20, small.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The batched EL against the float64 loop reference, per feature map
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"unbiased": False}, {"kernel": "linear"}, {"bandwidth": 0.5}],
)
def test_embedding_loss_matches_float64_loop_reference(options):
    bank = _bank()
    loss_fn = EmbeddingLoss(bank, **options)
    generated, real = _images(6, 0), _images(5, 1, shift=0.3)
    out = loss_fn(generated, real)
    kernel = options.get("kernel", "gaussian")
    unbiased = options.get("unbiased", True)
    for got, a, b in zip(out.per_feature, bank(generated), bank(real)):
        expected = reference_mmd2(a, b, kernel, options.get("bandwidth"), unbiased=unbiased)
        assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("options", [{}, {"unbiased": False}, {"kernel": "linear"}])
def test_per_class_embedding_loss_matches_float64_loop_reference(options):
    bank = _bank()
    loss_fn = EmbeddingLoss(bank, per_class=True, **options)
    generated, real = _images(9, 2), _images(10, 3, shift=0.2)
    gen_labels = torch.tensor([5, 5, 5, 1, 2, 2, 7, 7, 7], dtype=torch.int32)
    real_labels = torch.tensor([5, 5, 1, 1, 2, 2, 2, 3, 7, 7])
    out = loss_fn(generated, real, gen_labels, real_labels)
    kernel = options.get("kernel", "gaussian")
    unbiased = options.get("unbiased", True)
    # Class 1 has 1 generated sample and class 3 none: classes 5, 2 and 7 count.
    for got, a, b in zip(out.per_feature, bank(generated), bank(real)):
        per_class = [
            reference_mmd2(a[gen_labels == c], b[real_labels == c], kernel, unbiased=unbiased)
            for c in (5, 2, 7)
        ]
        assert float(got) == pytest.approx(sum(per_class) / 3, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_closed_form_backward_matches_autograd_for_either_sample(kernel):
    from lightning_losses.losses._mmd_maps import _pooled_matrices

    x, y = _samples(m=5, n=4, d=3)
    for needs in [(True, False), (False, True), (True, True)]:
        a = x.clone().requires_grad_(needs[0])
        b = y.clone().requires_grad_(needs[1])
        value = mmd2(a, b, kernel, bandwidth=1.5)
        wanted = [t for t in (a, b) if t.requires_grad]
        got = torch.autograd.grad(value, wanted)
        ra = x.clone().requires_grad_(needs[0])
        rb = y.clone().requires_grad_(needs[1])
        mats, scale = _pooled_matrices(ra[None], rb[None], kernel == "linear")
        if kernel == "linear":
            k = mats * scale * scale
        else:
            k = sum(torch.exp(mats * scale**2 / (-s * 1.5)) for s in MULTIPLIERS)
        m, n = 5, 4
        eye = torch.eye(9, dtype=torch.bool)[None]
        k0 = k.masked_fill(eye, 0.0)
        ref = (
            k0[:, :m, :m].sum() / (m * (m - 1))
            + k0[:, m:, m:].sum() / (n * (n - 1))
            - 2 * k[:, :m, m:].sum() / (m * n)
        )
        assert float(value.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
        expected = torch.autograd.grad(ref, [t for t in (ra, rb) if t.requires_grad])
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_mmd2_double_backward(kernel):
    x, y = _samples(m=4, n=3, d=2)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: mmd2(a, b, kernel, bandwidth=2.0), (x, y))
