"""Tests for lightning_losses.nets: CIFAR ResNets, torchvision backbones, SmallCNN, MLPBackbone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_losses.nets import (
    TORCHVISION_RESNETS,
    CifarResNet,
    MLPBackbone,
    SmallCNN,
    TorchvisionBackbone,
    feature_dim_of,
    load_state_dict_file,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these small CPU workloads on one intra-op thread.

    On a 2-core machine shared with other processes, two OpenMP threads spin-waiting on each other
    made the digits training ten times slower than one thread; restore the setting afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# ----------------------------------------------------------------------------- CifarResNet


@pytest.mark.parametrize(
    ("factory", "depth", "paper_params"),
    [
        (resnet20, 20, 0.27e6),
        (resnet32, 32, 0.46e6),
        (resnet44, 44, 0.66e6),
        (resnet56, 56, 0.85e6),
        (resnet110, 110, 1.7e6),
    ],
)
def test_cifar_resnet_depths_shapes_and_param_counts(factory, depth, paper_params):
    torch.manual_seed(0)
    net = factory()
    assert isinstance(net, CifarResNet)
    assert net.feature_dim == 64
    assert feature_dim_of(net) == 64
    n = (depth - 2) // 6
    assert net.blocks_per_stage == n
    assert [len(net.layer1), len(net.layer2), len(net.layer3)] == [n, n, n]
    # 2 convs per block + stem conv = depth - 1 3x3 convs (the classifier is the remaining layer).
    convs3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == depth - 1
    assert abs(_num_params(net) - paper_params) / paper_params < 0.05
    feats = net(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 64)
    assert (feats >= 0).all()
    assert feats.abs().sum() > 0


def test_cifar_resnet_stage_shapes_and_projection_shortcuts():
    net = CifarResNet(20, width=8)
    assert net.feature_dim == 32
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert shapes == {"layer1": (2, 8, 32, 32), "layer2": (2, 16, 16, 16), "layer3": (2, 32, 8, 8)}
    # Option B: the first block of stages 2 and 3 projects with a strided 1x1 conv + BN.
    for stage in (net.layer2, net.layer3):
        proj = stage[0].shortcut
        assert isinstance(proj, nn.Sequential)
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)
        assert proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
    identities = [b.shortcut for b in net.layer1] + [net.layer2[1].shortcut, net.layer3[2].shortcut]
    assert all(isinstance(s, nn.Identity) for s in identities)


def test_cifar_resnet_in_channels_and_width():
    net = resnet20(in_channels=1)
    assert net.conv1.in_channels == 1
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 64)
    wide = CifarResNet(8, in_channels=3, width=4)
    assert wide.feature_dim == 16
    assert wide(torch.randn(1, 3, 16, 16)).shape == (1, 16)


def test_cifar_resnet_kaiming_init():
    torch.manual_seed(0)
    net = resnet56()
    # Kaiming normal, fan_out, ReLU: std = sqrt(2 / (out_channels * 9)) for the 64-channel convs.
    w = net.layer3[1].conv1.weight
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05
    assert torch.equal(net.bn1.weight, torch.ones(16))
    assert torch.equal(net.bn1.bias, torch.zeros(16))


@pytest.mark.parametrize("depth", [21, 19, 2, 0, -4, 56.0, "56", True])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"in_channels": 0}, "in_channels"), ({"width": 0}, "width")]
)
def test_cifar_resnet_bad_channels(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CifarResNet(20, **kwargs)


# ----------------------------------------------------------------------------- TorchvisionBackbone


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("resnet18", 512),
        ("resnet34", 512),
        ("resnet50", 2048),
        ("resnet101", 2048),
        ("resnet152", 2048),
    ],
)
def test_torchvision_backbone_names_on_meta(name, dim):
    from torchvision import models

    # The meta device checks structure and shapes without paying for the initialisation.
    with torch.device("meta"):
        net = TorchvisionBackbone(name)
        reference = getattr(models, name)(weights=None)
    assert net.feature_dim == dim
    assert feature_dim_of(net) == dim
    assert not any(k.startswith("fc.") for k in net.state_dict())
    # Same parameters and keys as torchvision's model, minus the classifier.
    assert _num_params(net) == _num_params(reference) - _num_params(reference.fc)
    assert set(net.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}
    assert net(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, dim)


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_torchvision_backbone_features(name, dim):
    torch.manual_seed(0)
    net = TorchvisionBackbone(name).eval()
    with torch.no_grad():
        feats = net(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, dim)
    assert (feats >= 0).all()
    assert feats.abs().sum() > 0


def test_torchvision_backbone_matches_torchvision_features():
    from torchvision import models

    torch.manual_seed(0)
    reference = models.resnet18(weights=None).eval()
    net = TorchvisionBackbone("resnet18").eval()
    net.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    )
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))


@pytest.mark.parametrize("name", ["resnet", "resnet9", "ResNet18", "vgg16", ""])
def test_torchvision_backbone_bad_name(name):
    with pytest.raises(ValueError, match="name must be one of resnet18, resnet34, resnet50"):
        TorchvisionBackbone(name)


def test_torchvision_backbone_in_channels_one():
    net = TorchvisionBackbone("resnet18", in_channels=1).eval()
    assert net.conv1.in_channels == 1
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 64)).shape == (2, 512)
    with pytest.raises(ValueError, match="in_channels"):
        TorchvisionBackbone("resnet18", in_channels=0)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_torchvision_backbone_small_input(in_channels):
    net = TorchvisionBackbone("resnet18", in_channels=in_channels, small_input=True).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == in_channels
    assert isinstance(net.maxpool, nn.Identity)
    seen = {}
    net.layer4.register_forward_hook(lambda _m, _i, out: seen.__setitem__("shape", out.shape))
    with torch.no_grad():
        feats = net(torch.randn(2, in_channels, 32, 32))
    assert feats.shape == (2, 512)
    assert (feats >= 0).all()
    assert tuple(seen["shape"]) == (2, 512, 4, 4)  # 32 / 8, not 32 / 32 as with the ImageNet stem


def test_torchvision_backbone_imagenet_stem_on_32x32_reaches_1x1():
    net = TorchvisionBackbone("resnet18").eval()
    seen = {}
    net.layer4.register_forward_hook(lambda _m, _i, out: seen.__setitem__("shape", out.shape))
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    assert tuple(seen["shape"]) == (2, 512, 1, 1)


class _Opaque:
    """An arbitrary class: unpickling it needs code execution, which weights_only refuses."""


def _save(state: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("with_fc", [False, True])
def test_torchvision_backbone_weights_round_trip(tmp_path, suffix, with_fc):
    torch.manual_seed(0)
    source = TorchvisionBackbone("resnet18", small_input=True)
    # Make BatchNorm buffers non-default so the round trip covers them too.
    source.train()
    with torch.no_grad():
        source(torch.randn(4, 3, 16, 16))
    state = source.state_dict()
    if with_fc:
        state = {**state, "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    path = tmp_path / f"weights{suffix}"
    _save(state, path)

    torch.manual_seed(1)
    loaded = TorchvisionBackbone("resnet18", small_input=True, weights=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_torchvision_backbone_loads_torchvision_checkpoint_with_fc(tmp_path):
    from torchvision import models

    torch.manual_seed(0)
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = TorchvisionBackbone("resnet18", weights=str(path))
    torch.testing.assert_close(net.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(net.bn1.running_var, reference.bn1.running_var)


def test_torchvision_backbone_mismatched_keys_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.safetensors"
    _save(TorchvisionBackbone("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="weights") as info:
        TorchvisionBackbone("resnet34", weights=str(path))
    message = str(info.value)
    with torch.device("meta"):
        n_missing = len(set(TorchvisionBackbone("resnet34").state_dict()) - set(load_file(path)))
    assert n_missing > 0
    assert "resnet34" in message
    assert f"Missing keys ({n_missing}): layer1.2.bn1.bias" in message
    assert "unexpected keys (0)" in message


def test_torchvision_backbone_mismatched_shapes_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    state = TorchvisionBackbone("resnet18").state_dict()
    state["extra.weight"] = torch.zeros(3)
    _save(state, path)
    with pytest.raises(ValueError, match="weights") as info:
        TorchvisionBackbone("resnet18", in_channels=1, weights=str(path))
    message = str(info.value)
    assert "conv1.weight: file (64, 3, 7, 7) vs model (64, 1, 7, 7)" in message
    assert "extra.weight" in message
    assert "Missing keys (0)" in message


def test_load_state_dict_file_is_safe(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"a": _Opaque()}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(unsafe)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="mapping"):
        load_state_dict_file(not_a_dict)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, checkpoint)
    with pytest.raises(ValueError, match="save its 'state_dict' entry"):
        load_state_dict_file(checkpoint)
    with pytest.raises(FileNotFoundError, match="weights"):
        TorchvisionBackbone("resnet18", weights=str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- SmallCNN


@pytest.mark.parametrize(("size", "in_channels"), [(4, 1), (8, 1), (13, 1), (28, 1), (32, 3)])
def test_small_cnn_shapes(size, in_channels):
    net = SmallCNN(in_channels=in_channels)
    feats = net(torch.randn(5, in_channels, size, size))
    assert feats.shape == (5, 64)
    assert (feats >= 0).all()
    assert feature_dim_of(net) == 64
    custom = SmallCNN(in_channels=in_channels, width=8, feature_dim=20)
    assert custom.feature_dim == 20
    assert custom(torch.randn(2, in_channels, size, size)).shape == (2, 20)


def test_small_cnn_is_small_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = SmallCNN()
    assert _num_params(net) <= 100_000
    head = nn.Linear(net.feature_dim, 10)
    x = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 10
    nn.functional.cross_entropy(head(net(x)), y).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 0}, {"width": 0}, {"feature_dim": -1}, {"width": 2.5}]
)
def test_small_cnn_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SmallCNN(**kwargs)


def test_small_cnn_learns_sklearn_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=generator)
    train, test = perm[:1400], perm[1400:]
    net = SmallCNN()
    head = nn.Linear(net.feature_dim, 10)
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(3):
        net.train()
        order = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(head(net(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (head(net(x[test])).argmax(1) == y[test]).float().mean().item()
    assert accuracy >= 0.95


# ----------------------------------------------------------------------------- MLPBackbone


@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_mlp_backbone_layers_and_shapes(num_layers):
    net = MLPBackbone(in_features=3 * 4 * 4, hidden=16, feature_dim=8, num_layers=num_layers)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(linears) == len(relus) == num_layers
    assert linears[0].in_features == 48 and linears[-1].out_features == 8
    assert all(lin.out_features == 16 for lin in linears[:-1])
    feats = net(torch.randn(6, 3, 4, 4))
    assert feats.shape == (6, 8)
    assert (feats >= 0).all()
    assert feature_dim_of(net) == 8


def test_mlp_backbone_has_no_batchnorm_and_is_batch_independent():
    torch.manual_seed(0)
    net = MLPBackbone(in_features=10)
    assert not _has_batchnorm(net)
    assert _has_batchnorm(SmallCNN())  # the helper does detect BatchNorm
    net.train()
    x = torch.randn(8, 10)
    # Each sample's features do not depend on the rest of the batch, even in train mode.
    torch.testing.assert_close(net(x)[:3], net(x[:3]))


def test_mlp_backbone_errors():
    with pytest.raises(ValueError, match="in_features"):
        MLPBackbone(in_features=0)
    with pytest.raises(ValueError, match="num_layers"):
        MLPBackbone(in_features=4, num_layers=0)
    with pytest.raises(ValueError, match="hidden"):
        MLPBackbone(in_features=4, hidden=0)
    with pytest.raises(ValueError, match="in_features"):
        MLPBackbone(in_features=10)(torch.randn(2, 11))


# ----------------------------------------------------------------------------- feature_dim_of


def test_feature_dim_of_errors():
    with pytest.raises(ValueError, match="set a `feature_dim` attribute .* pass feature_dim"):
        feature_dim_of(nn.Linear(3, 4))
    bad = nn.Identity()
    bad.feature_dim = "64"
    with pytest.raises(ValueError, match="feature_dim"):
        feature_dim_of(bad)
    good = nn.Identity()
    good.feature_dim = 7
    assert feature_dim_of(good) == 7


def test_supported_names_constant():
    assert TORCHVISION_RESNETS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
