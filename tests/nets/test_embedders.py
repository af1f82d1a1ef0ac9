"""RandomEmbedderBank: frozen, seed-determined, BatchNorm-free, batch-independent, resampled."""

from __future__ import annotations

import pytest
import torch

from lightning_losses.nets import EMBEDDER_FAMILIES, RandomEmbedderBank


def _bank(**kwargs) -> RandomEmbedderBank:
    kwargs.setdefault("in_channels", 3)
    kwargs.setdefault("width", 4)
    return RandomEmbedderBank(**kwargs)


def _images(batch=5, channels=3, size=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g) * 2 - 1


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_and_features_are_determined_by_seed():
    torch.manual_seed(123)
    first = _bank(seed=0)
    torch.manual_seed(456)  # the global RNG plays no part
    second = _bank(seed=0)
    other = _bank(seed=1)
    assert _same_weights(first, second)
    assert not _same_weights(first, other)
    x = _images()
    for a, b, c in zip(first(x), second(x), other(x)):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_construction_leaves_global_rng_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _bank(num_networks=5)
    assert torch.equal(torch.rand(3), expected)


def test_families_cycle_and_no_batchnorm_anywhere():
    bank = _bank(num_networks=6)
    assert bank.families == [*EMBEDDER_FAMILIES, *EMBEDDER_FAMILIES[:2]]
    assert len({type(net) for net in bank.networks}) == len(EMBEDDER_FAMILIES)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.SyncBatchNorm)
    assert not any(isinstance(m, norms) for m in bank.modules())
    # The networks of one family differ: one generator draws them in turn.
    assert not torch.equal(bank.networks[0].convs[0].weight, bank.networks[4].convs[0].weight)


def test_bank_is_frozen_and_stays_in_eval_mode():
    bank = _bank()
    assert all(not p.requires_grad for p in bank.parameters())
    bank.train()
    assert not bank.training and not any(m.training for m in bank.modules())
    x = _images().requires_grad_()
    sum(f.sum() for f in bank(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the input
    assert all(p.grad is None for p in bank.parameters())


@pytest.mark.parametrize(("channels", "size", "batch"), [(1, 8, 3), (3, 13, 2), (3, 64, 2)])
def test_features_are_pooled_per_stage(channels, size, batch):
    bank = _bank(in_channels=channels, width=4)
    features = bank(_images(batch, channels, size))
    assert [tuple(f.shape) for f in features] == [(batch, d) for d in bank.feature_dims]
    assert len(features) == 3 + 3 + 1 + 3
    assert all(torch.isfinite(f).all() for f in features)
    # Different images give different features in every map (nothing is constant).
    assert all((f[0] - f[1]).abs().max() > 0 for f in features)


def test_features_do_not_depend_on_batch_composition():
    bank = _bank()
    x = _images(batch=6, seed=3)
    together = bank(x)
    alone = bank(x[2:3])
    with_others = bank(torch.cat([_images(batch=4, seed=9), x[2:3]]))
    for t, a, w in zip(together, alone, with_others):
        assert torch.allclose(t[2:3], a, atol=1e-5, rtol=1e-5)
        assert torch.allclose(w[-1:], a, atol=1e-5, rtol=1e-5)


def test_resampling_is_deterministic_and_rank_shared():
    bank = _bank(seed=3, resample_every=10)
    twin = _bank(seed=3, resample_every=10)
    start = {k: v.clone() for k, v in bank.state_dict().items()}
    assert not bank.maybe_resample(0)
    assert not bank.maybe_resample(5)
    assert all(torch.equal(start[k], v) for k, v in bank.state_dict().items())
    assert bank.maybe_resample(10)
    assert bank.current_seed == 4
    assert not all(torch.equal(start[k], v) for k, v in bank.state_dict().items())
    assert _same_weights(bank, _bank(seed=4))
    assert twin.maybe_resample(10)  # another rank, same step: same weights, no communication
    assert _same_weights(bank, twin)
    assert bank.maybe_resample(20) and _same_weights(bank, _bank(seed=5))
    assert all(not p.requires_grad for p in bank.parameters())
    never = _bank(seed=3)
    assert not never.maybe_resample(10)
    assert _same_weights(never, _bank(seed=3))


def test_bank_rejects_bad_arguments_and_inputs():
    bank = _bank()
    with pytest.raises(ValueError, match="x has 1 channels"):
        bank(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="spatial size"):
        bank(torch.zeros(2, 3, 7, 8))
    with pytest.raises(ValueError, match="4-D"):
        bank(torch.zeros(2, 3, 8))
    for kwargs, name in [
        ({"in_channels": 0}, "in_channels"),
        ({"num_networks": 0}, "num_networks"),
        ({"width": 0}, "width"),
        ({"seed": -1}, "seed"),
        ({"resample_every": -1}, "resample_every"),
        ({"families": ["vit"]}, "families"),
        ({"families": []}, "families"),
    ]:
        with pytest.raises(ValueError, match=name):
            _bank(**kwargs)


def test_bank_accepts_other_float_dtypes():
    bank = _bank()
    x = _images()
    expected = bank(x)
    for got, want in zip(bank(x.double()), expected):
        assert got.dtype == torch.float32
        assert torch.allclose(got, want)


def _plain_features(bank: RandomEmbedderBank, x: torch.Tensor) -> list[torch.Tensor]:
    """The families' definitions with plain convolutions (the reference of the fast paths)."""
    import torch.nn.functional as F

    out = []
    for net, family in zip(bank.networks, bank.families):
        if family == "wide":
            out.append(F.relu(net.conv(x)).mean(dim=(2, 3)))
        elif family == "patch_mlp":
            tokens = F.gelu(net.patchify(x)).flatten(2).transpose(1, 2)
            out.append(tokens.mean(dim=1))
            for block in net.blocks:
                tokens = tokens + block(tokens)
                out.append(tokens.mean(dim=1))
        elif family == "resnet":
            h = net.stem(x)
            for block in net.blocks:
                h = block(h)  # every convolution run, the last block's too
                out.append(h.mean(dim=(2, 3)))
        else:
            out.extend(net(x))
    return out


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 13), (3, 16)])
def test_fast_paths_match_plain_convolutions_in_value_and_gradient(channels, size):
    bank = _bank(in_channels=channels, width=4)
    x = _images(4, channels, size, seed=1).double()
    bank = bank.double()
    fast_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, plain = bank(fast_x), _plain_features(bank, plain_x)
    for a, b in zip(fast, plain):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    weights = [torch.randn(f.shape, dtype=torch.float64) for f in fast]
    sum((w * f).sum() for w, f in zip(weights, fast)).backward()
    sum((w * f).sum() for w, f in zip(weights, plain)).backward()
    assert torch.allclose(fast_x.grad, plain_x.grad, rtol=1e-10, atol=1e-12)


def test_fused_wide_path_gradcheck_and_fallbacks():
    bank = _bank(in_channels=2, width=2, families=["wide"], num_networks=1).double()
    x = _images(3, 2, 8, seed=2).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bank(t)[0], (x,))
    # Trainable weights (not the frozen bank) and autocast take the plain autograd path.
    net = bank.networks[0]
    net.requires_grad_(True)
    bank(x)[0].sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0
    net.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bank.float()(x.float())
    assert low[0].dtype == torch.bfloat16
    assert torch.allclose(low[0].float(), bank(x.float())[0], rtol=2e-2, atol=2e-2)


def test_patchify_of_sizes_not_divisible_by_the_patch():
    bank = _bank(in_channels=1, width=4, families=["patch_mlp"], num_networks=1)
    x = _images(2, 1, 10, seed=3)  # 10 = 2 x 4 + 2: the conv drops the last 2 rows / columns
    for a, b in zip(bank(x), _plain_features(bank, x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_empty_batch_and_wrong_device():
    bank = _bank(in_channels=1, width=4)
    x = torch.zeros(0, 1, 8, 8, requires_grad=True)
    features = bank(x)
    assert [tuple(f.shape) for f in features] == [(0, d) for d in bank.feature_dims]
    sum(f.sum() for f in features).backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="x is on meta but the bank is on cpu"):
        bank(torch.zeros(2, 1, 8, 8, device="meta"))


def test_a_retained_graph_gives_the_same_gradient_twice():
    bank = _bank(in_channels=1, width=4)
    x = _images(3, 1, 8, seed=4).requires_grad_()
    loss = sum(f.square().sum() for f in bank(x))
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [
        (3, 1, 1, 2),
        (3, 1, 1, 5),
        (3, 2, 1, 7),
        (5, 1, 2, 8),
        (1, 2, 0, 7),
        (3, 1, 0, 6),
        (4, 4, 0, 10),
    ],
)
def test_pooled_convolution_shortcuts_match_the_convolution(kernel, stride, padding, size):
    """_mean_of_conv (the last ResNet block's pooled output) and _relu_mean_of_conv (the wide
    net's gathered patches) against the plain convolution, value and input gradient, float64."""
    import torch.nn.functional as F

    from lightning_losses.nets.embedders import _mean_of_conv, _relu_mean_of_conv

    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double()
    conv.requires_grad_(False)
    x = _images(4, 3, size, seed=5).double()
    weights = torch.randn(4, 5, dtype=torch.float64)
    for fast, plain in (
        (_mean_of_conv, lambda t: conv(t).mean(dim=(2, 3))),
        (_relu_mean_of_conv, lambda t: F.relu(conv(t)).mean(dim=(2, 3))),
    ):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = fast(a, conv), plain(b)
        assert got.shape == want.shape == (4, 5)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        (weights * got).sum().backward()
        (weights * want).sum().backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _mean_of_conv(t, conv), (x[:2].requires_grad_(),))
    # The folded matrix follows an in-place re-draw of the weights (as maybe_resample does) ...
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    assert torch.allclose(_mean_of_conv(x, conv), conv(x).mean(dim=(2, 3)), rtol=1e-12)
    # ... and trainable weights take the two-product form, with weight gradients.
    conv.requires_grad_(True)
    got = _mean_of_conv(x, conv)
    assert torch.allclose(got, conv(x).mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
