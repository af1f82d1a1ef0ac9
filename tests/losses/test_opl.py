"""Orthogonal Projection Loss against a slow float64 reference, on edge cases and across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from fakes import clustered_features

from lightning_losses.losses import (
    OrthogonalProjectionLoss,
    all_gather_rows,
    orthogonal_projection_loss,
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
    ],
)
def test_bad_input_raises_value_error(features, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthogonal_projection_loss(features, labels, **kwargs)


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
# batch, and gradients after DDP's average equal single-process gradients.

WORLD = 2
SIZES = (5, 3)  # uneven on purpose: the gather must pad and trim


def _global_batch():
    g = torch.Generator().manual_seed(11)
    features = torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (sum(SIZES),), generator=g)
    return features, labels


def _ddp_worker(rank: int, port: int, abs_mode: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        features, labels = _global_batch()
        start = sum(SIZES[:rank])
        local = features[start : start + SIZES[rank]].clone().requires_grad_(True)
        loss_fn = OrthogonalProjectionLoss(gamma=0.5, abs_mode=abs_mode, gather_distributed=True)
        out = loss_fn(local, labels[start : start + SIZES[rank]])
        out.loss.backward()
        # What DDP does to parameter gradients: the average over ranks of each rank's gradient.
        grad = torch.zeros_like(features)
        grad[start : start + SIZES[rank]] = local.grad
        torch.distributed.all_reduce(grad)
        results[rank] = (out.loss.detach(), grad / WORLD)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("abs_mode", ["none", "pair"])
def test_gathered_loss_and_gradient_equal_single_process(abs_mode):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _ddp_worker,
            args=(_free_port(), abs_mode, results),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    features, labels = _global_batch()
    x = features.clone().requires_grad_(True)
    single = orthogonal_projection_loss(x, labels, 0.5, abs_mode).loss
    single.backward()
    for rank in range(WORLD):
        loss, grad = results[rank]
        torch.testing.assert_close(loss, single.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-12)
