"""Tests of the calibration data: views, shifted test sets and CalibrationDataModule.

CIFAR-10-C and the ImageNet variants are read from tiny files written in their real on-disk
formats (``.npy`` arrays; PNG / JPEG class folders).
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_losses.datamodules import (
    CIFAR10C_CORRUPTIONS,
    CORRUPTIONS,
    CalibrationDataModule,
    CIFAR10CDataset,
    CIFAR10DataModule,
    CorruptedDataset,
    Denormalized,
    DigitsDataModule,
    EpochSeededRandomSampler,
    ImageNetVariantFolder,
    MinMaxRescaled,
    ViewsDataset,
    cifar10c_test_sets,
    corrupted_test_sets,
    dataset_targets,
    default_view_transforms,
    restrict_logits,
)
from tests.fakes import quiet_trainer


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


def _images(dataset: Dataset, n: int | None = None) -> torch.Tensor:
    n = len(dataset) if n is None else n
    return torch.stack([dataset[i][0] for i in range(n)])


# --------------------------------------------------------------------------------------------
# views


def test_views_shapes_and_format(digits):
    data = ViewsDataset(digits.test_dataset, seed=0)
    assert data.num_views == 3
    assert len(data) == len(digits.test_dataset)
    image, views, label = data[5]
    clean, clean_label = digits.test_dataset[5]
    assert torch.equal(image, clean)
    assert int(label) == int(clean_label)
    assert views.shape == (3, 1, 8, 8)
    assert views.dtype == torch.float32
    images, views, labels = next(iter(DataLoader(data, batch_size=4)))
    assert images.shape == (4, 1, 8, 8)
    assert views.shape == (4, 3, 1, 8, 8)
    assert labels.shape == (4,)


def test_views_are_deterministic_and_independent_of_access_order(digits):
    data = ViewsDataset(digits.test_dataset, seed=3)
    forward = [data[i][1] for i in range(12)]
    torch.manual_seed(123)
    backward = [data[i][1] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    # a fresh wrapper, a negative index and loader workers give the same views
    again = ViewsDataset(digits.test_dataset, seed=3)
    assert torch.equal(again[11][1], forward[11])
    assert torch.equal(again[-len(again) + 4][1], forward[4])
    loader = DataLoader(torch.utils.data.Subset(again, range(12)), batch_size=3, num_workers=2)
    batched = torch.cat([views for _, views, _ in loader])
    assert torch.equal(batched, torch.stack(forward))
    # another seed gives other views
    other = ViewsDataset(digits.test_dataset, seed=4)
    assert not torch.equal(other[0][1], forward[0])


def test_views_leave_the_global_rng_alone(digits):
    data = ViewsDataset(digits.test_dataset)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    data[0]
    data[1]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_differ_from_the_image_and_from_each_other(channels):
    g = torch.Generator().manual_seed(0)
    # smooth-ish random images, normalised (negative values included)
    images = torch.nn.functional.avg_pool2d(torch.randn(8, channels, 18, 18, generator=g), 3, 1)
    images = (images - images.mean()) / images.std()
    data = ViewsDataset(TensorDataset(images, torch.zeros(8)), seed=1)
    for i in range(8):
        image, views, _ = data[i]
        assert views.shape == (3, channels, 16, 16)
        assert torch.isfinite(views).all()
        for j in range(3):
            assert (views[j] - image).abs().mean() > 1e-3
            for k in range(j):
                assert (views[j] - views[k]).abs().mean() > 1e-3
        # min-max rescaling keeps the views in the input's value range
        assert views.min() >= image.min() - 1e-4
        assert views.max() <= image.max() + 1e-4


def test_default_views_for_rgb_are_rotation_greyscale_and_jitter():
    transforms = default_view_transforms(3, 32)
    assert len(transforms) == 3
    assert all(isinstance(t, MinMaxRescaled) for t in transforms)
    names = [repr(t) for t in transforms]
    assert "RandomRotation" in names[0]
    assert "Grayscale" in names[1]
    assert "ColorJitter" in names[2]
    image = torch.rand(3, 32, 32) * 4 - 2
    grey = transforms[1](image)
    assert torch.allclose(grey[0], grey[1], atol=1e-5)
    assert torch.allclose(grey[1], grey[2], atol=1e-5)
    ones = default_view_transforms(1, 8)
    assert "RandomRotation" in repr(ones[0])
    assert "GaussianBlur" in repr(ones[1])
    assert "RandomAffine" in repr(ones[2])


def test_denormalized_views_run_on_the_raw_image():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    transforms = default_view_transforms(3, 32, mean=mean, std=std)
    assert all(isinstance(t, Denormalized) for t in transforms)
    raw = torch.rand(3, 32, 32)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    normalised = (raw - m) / s
    # greyscale of the raw image, normalised back: exactly what the classifier would get
    from torchvision.transforms.v2 import functional as TF

    expected = (TF.rgb_to_grayscale(raw, num_output_channels=3) - m) / s
    assert torch.allclose(transforms[1](normalised), expected, atol=1e-5)
    jittered = transforms[2](normalised) * s + m
    assert jittered.min() >= -1e-5 and jittered.max() <= 1 + 1e-5


def test_views_errors(digits):
    with pytest.raises(ValueError, match="num_channels"):
        default_view_transforms(2, 8)
    with pytest.raises(ValueError, match="image_size"):
        default_view_transforms(1, 0)
    with pytest.raises(ValueError, match="mean and std"):
        default_view_transforms(3, 32, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        Denormalized(lambda x: x, 0.0, 0.0)
    with pytest.raises(ValueError, match="transforms"):
        ViewsDataset(digits.test_dataset, transforms=[])
    with pytest.raises(ValueError, match="seed"):
        ViewsDataset(digits.test_dataset, seed=1.5)
    bad = ViewsDataset(digits.test_dataset, transforms=[lambda x: x[:, :4]])
    with pytest.raises(ValueError, match="shape"):
        bad[0]
    with pytest.raises(IndexError):
        ViewsDataset(digits.test_dataset)[len(digits.test_dataset)]


# --------------------------------------------------------------------------------------------
# corruptions


def test_corruption_registry_has_the_promised_names():
    for name in ("rotation", "gaussian_noise", "gaussian_blur", "contrast", "shift"):
        assert name in CORRUPTIONS


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 20, 33)])
def test_corruptions_keep_shape_and_are_deterministic(name, shape):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fn = CORRUPTIONS[name]
    out = fn(image, 3, torch.Generator().manual_seed(5))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.isfinite(out).all()
    assert not torch.equal(out, image)
    assert torch.equal(fn(image, 3, torch.Generator().manual_seed(5)), out)
    assert torch.equal(image, torch.randn(shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_strength_increases_with_severity_on_digits(digits, name):
    test = digits.test_dataset
    clean = test.tensors[0][:120]
    distances = []
    for severity in range(1, 6):
        corrupted = _images(CorruptedDataset(test, name, severity, seed=0), 120)
        distances.append(float((corrupted - clean).abs().mean()))
    assert all(b > a for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0


def test_corruption_details():
    g = torch.Generator
    image = torch.randn(3, 16, 16, generator=g().manual_seed(0)) * 2 + 1
    # contrast keeps each channel's mean
    reduced = CORRUPTIONS["contrast"](image, 5, g())
    assert torch.allclose(reduced.mean(dim=(1, 2)), image.mean(dim=(1, 2)), atol=1e-5)
    # noise is clipped to the image's range
    noisy = CORRUPTIONS["gaussian_noise"](image, 5, g().manual_seed(0))
    assert noisy.min() >= image.min() and noisy.max() <= image.max()
    # geometric corruptions of a constant image leave it constant (fill = background)
    flat = torch.full((1, 8, 8), -0.7)
    for name in ("rotation", "shift", "gaussian_blur", "occlusion"):
        assert torch.allclose(CORRUPTIONS[name](flat, 5, g().manual_seed(1)), flat, atol=1e-6)
    # salt and pepper only uses the image's extremes, on more pixels with severity
    changed = []
    for severity in (1, 5):
        out = CORRUPTIONS["salt_pepper"](image, severity, g().manual_seed(2))
        hit = (out != image).any(dim=0)
        values = out[:, hit].flatten()
        assert bool(((values == image.max()) | (values == image.min())).all())
        changed.append(hit)
    assert bool((changed[1] | ~changed[0]).all())  # severity 5 corrupts a superset
    # random corruptions depend on the generator
    a = CORRUPTIONS["gaussian_noise"](image, 3, g().manual_seed(0))
    b = CORRUPTIONS["gaussian_noise"](image, 3, g().manual_seed(1))
    assert not torch.equal(a, b)


def test_corruption_errors():
    image = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="severity"):
        CORRUPTIONS["rotation"](image, 0, torch.Generator())
    with pytest.raises(ValueError, match="image"):
        CORRUPTIONS["contrast"](torch.zeros(8, 8), 1, torch.Generator())
    with pytest.raises(ValueError, match="image"):
        CORRUPTIONS["contrast"](torch.zeros(1, 8, 8, dtype=torch.uint8), 1, torch.Generator())


def test_corrupted_dataset(digits):
    test = digits.test_dataset
    data = CorruptedDataset(test, "gaussian_noise", 3, seed=0)
    assert len(data) == len(test)
    assert data.name == "gaussian_noise-3"
    first = [data[i][0] for i in range(5)]
    assert torch.equal(data[3][0], first[3])  # access order does not matter
    assert torch.equal(data[-len(data) + 2][0], first[2])
    assert int(data[0][1]) == int(test[0][1])
    assert not torch.equal(first[0], first[1] - test[1][0] + test[0][0])
    assert not torch.equal(CorruptedDataset(test, "gaussian_noise", 3, seed=1)[0][0], first[0])
    with pytest.raises(ValueError, match=r"corruption must be one of \[.*'rotation'"):
        CorruptedDataset(test, "fog", 3)
    with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3, 4, 5\)"):
        CorruptedDataset(test, "rotation", 6)
    with pytest.raises(ValueError, match="severity"):
        CorruptedDataset(test, "rotation", True)
    with pytest.raises(ValueError, match="seed"):
        CorruptedDataset(test, "rotation", 1, seed="0")


def test_corrupted_test_sets(digits):
    sets = corrupted_test_sets(digits.test_dataset, ["rotation", "contrast"], (1, 5), seed=2)
    assert list(sets) == ["rotation-1", "rotation-5", "contrast-1", "contrast-5"]
    assert all(isinstance(d, CorruptedDataset) and d.seed == 2 for d in sets.values())
    assert sets["contrast-5"].severity == 5
    everything = corrupted_test_sets(digits.test_dataset)
    assert list(everything) == [f"{c}-{s}" for c in CORRUPTIONS for s in (1, 3, 5)]
    with pytest.raises(ValueError, match="corruption"):
        corrupted_test_sets(digits.test_dataset, ["blur"])
    with pytest.raises(ValueError, match="corruptions"):
        corrupted_test_sets(digits.test_dataset, "rotation")
    with pytest.raises(ValueError, match="severity"):
        corrupted_test_sets(digits.test_dataset, ["rotation"], (0,))


# --------------------------------------------------------------------------------------------
# CIFAR-10-C, in the released format


def _write_cifar10c(root: Path, per_severity: int = 4, names=("fog", "gaussian_noise")):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in names:
        array = rng.integers(0, 256, size=(5 * per_severity, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{name}.npy", array)
        arrays[name] = array
    labels = np.tile(np.arange(per_severity) % 10, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    return arrays, labels


def test_cifar10c_slices_severities_and_normalises(tmp_path):
    arrays, labels = _write_cifar10c(tmp_path)
    data = CIFAR10CDataset(tmp_path, "fog", 3)
    assert len(data) == 4
    assert data.targets == [int(t) for t in labels[8:12]]
    image, label = data[1]
    mean = torch.tensor(CIFAR10DataModule.mean).view(3, 1, 1)
    std = torch.tensor(CIFAR10DataModule.std).view(3, 1, 1)
    raw = torch.from_numpy(arrays["fog"][9]).permute(2, 0, 1).float() / 255.0
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image, (raw - mean) / std, atol=1e-6)
    assert label == int(labels[9])
    # a custom transform sees the PIL image; the data set pickles without its memory map
    plain = CIFAR10CDataset(tmp_path, "gaussian_noise", 5, transform=np.asarray)
    plain[0]
    clone = pickle.loads(pickle.dumps(plain))
    assert clone._images is None
    assert np.array_equal(clone[3][0], arrays["gaussian_noise"][19])
    assert CIFAR10C_CORRUPTIONS.count("fog") == 1
    sets = cifar10c_test_sets(tmp_path, severities=(1, 5))
    assert list(sets) == [
        "cifar10c-fog-1",
        "cifar10c-fog-5",
        "cifar10c-gaussian_noise-1",
        "cifar10c-gaussian_noise-5",
    ]


def test_cifar10c_errors(tmp_path):
    _write_cifar10c(tmp_path)
    with pytest.raises(
        ValueError, match=r"corruption must be one of .*\['fog', 'gaussian_noise'\]"
    ):
        CIFAR10CDataset(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        CIFAR10CDataset(tmp_path, "fog", 6)
    with pytest.raises(FileNotFoundError):
        CIFAR10CDataset(tmp_path / "missing", "fog", 1)
    np.save(tmp_path / "bad.npy", np.zeros((10, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="32, 32, 3"):
        CIFAR10CDataset(tmp_path, "bad", 1)
    np.save(tmp_path / "odd.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="5 severities"):
        CIFAR10CDataset(tmp_path, "odd", 1)
    np.save(tmp_path / "objects.npy", np.array([None] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle|Python objects"):
        CIFAR10CDataset(tmp_path, "objects", 1)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        CIFAR10CDataset(tmp_path, "fog", 1)


# --------------------------------------------------------------------------------------------
# ImageNet variants, on real PNG / JPEG class folders

_WNIDS = [f"n0{1440764 + 1000 * i:07d}" for i in range(12)]


def _write_folders(root: Path, names, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        folder = root / str(name)
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(30 + c, 40, 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "JPEG"
            Image.fromarray(pixels).save(folder / f"img_{i}.{ext}", format=None)


def test_imagenet_v2_int_folders_map_to_their_index(tmp_path):
    _write_folders(tmp_path, ["0", "2", "10", "999"])
    data = ImageNetVariantFolder(tmp_path, "V2", image_size=16)
    # ImageFolder sorts "0" < "10" < "2" < "999": the labels must still be the folder ints
    assert data.folder.classes == ["0", "10", "2", "999"]
    assert data.class_subset == [0, 2, 10, 999]
    assert data.num_classes == 1000
    assert sorted(Counter(data.targets).items()) == [(0, 2), (2, 2), (10, 2), (999, 2)]
    for i in range(len(data)):
        image, label = data[i]
        path = Path(data.folder.samples[i][0])
        assert label == int(path.parent.name) == data.targets[i]
        assert image.shape == (3, 16, 16)


def test_imagenet_r_wnid_folders_map_through_the_wnid_list(tmp_path):
    present = [_WNIDS[7], _WNIDS[1], _WNIDS[4]]
    _write_folders(tmp_path / "r", present)
    data = ImageNetVariantFolder(tmp_path / "r", "R", wnids=_WNIDS, image_size=8)
    assert data.class_subset == [1, 4, 7]
    assert data.num_classes == len(_WNIDS)
    assert data.folder_to_index == {_WNIDS[1]: 1, _WNIDS[4]: 4, _WNIDS[7]: 7}
    for i in range(len(data)):
        wnid = Path(data.folder.samples[i][0]).parent.name
        assert data[i][1] == _WNIDS.index(wnid) == data.targets[i]
    # the same order from a text file (first word per line) or from an ImageNet train folder
    listing = tmp_path / "LOC_synset_mapping.txt"
    listing.write_text("".join(f"{w} some name, other\n" for w in _WNIDS) + "\n")
    from_file = ImageNetVariantFolder(tmp_path / "r", "A", wnids=str(listing), image_size=8)
    assert from_file.targets == data.targets
    train = tmp_path / "train"
    for w in _WNIDS:
        (train / w).mkdir(parents=True)
    from_train = ImageNetVariantFolder(tmp_path / "r", "R", wnids=train, image_size=8)
    assert from_train.targets == data.targets
    # restricting 12-way logits to the classes present
    logits = torch.randn(5, len(_WNIDS))
    restricted = restrict_logits(logits, data.class_subset)
    probs = restricted.softmax(-1)
    assert torch.allclose(probs[:, data.class_subset], logits[:, [1, 4, 7]].softmax(-1))
    assert probs[:, [0, 2, 3, 5, 6, 8, 9, 10, 11]].eq(0).all()
    assert set(restricted.argmax(-1).tolist()) <= {1, 4, 7}


def test_imagenet_sketch_uses_its_own_folders_by_default(tmp_path):
    _write_folders(tmp_path, _WNIDS[:3], per_class=1)
    data = ImageNetVariantFolder(tmp_path, "S", image_size=8)
    assert data.class_subset == [0, 1, 2]
    assert data.targets == [0, 1, 2]


def test_imagenet_variant_errors(tmp_path):
    _write_folders(tmp_path / "a", [_WNIDS[0], "n99999999"], per_class=1)
    with pytest.raises(ValueError, match="wnids is required"):
        ImageNetVariantFolder(tmp_path / "a", "A")
    with pytest.raises(ValueError, match="not in wnids.*n99999999"):
        ImageNetVariantFolder(tmp_path / "a", "A", wnids=_WNIDS)
    with pytest.raises(ValueError, match="does not exist"):
        ImageNetVariantFolder(tmp_path / "a", "A", wnids=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="repeat"):
        ImageNetVariantFolder(tmp_path / "a", "A", wnids=[_WNIDS[0]] * 2)
    with pytest.raises(ValueError, match="variant"):
        ImageNetVariantFolder(tmp_path / "a", "C", wnids=_WNIDS)
    with pytest.raises(ValueError, match="ImageNetV2 class folders"):
        ImageNetVariantFolder(tmp_path / "a", "V2")
    with pytest.raises(FileNotFoundError):
        ImageNetVariantFolder(tmp_path / "missing", "V2")
    with pytest.raises(ValueError, match="class_subset"):
        restrict_logits(torch.zeros(2, 5), [5])


# --------------------------------------------------------------------------------------------
# CalibrationDataModule on the bundled digits


def test_calibration_properties_before_setup():
    cal = CalibrationDataModule(DigitsDataModule(image_size=16))
    assert cal.num_classes == 10
    assert cal.image_shape == (1, 16, 16)
    assert cal.num_views == 3
    assert cal.test_set_names[:4] == ["id", "rotation-1", "rotation-3", "rotation-5"]
    assert len(cal.test_set_names) == 1 + 4 * 3
    with pytest.raises(RuntimeError, match="setup"):
        cal.train_dataloader()
    with pytest.raises(RuntimeError, match="setup"):
        cal.test_dataloader()


def test_calibration_split_is_stratified_and_disjoint_from_test():
    inner = DigitsDataModule(seed=1)
    cal = CalibrationDataModule(inner, calibration_fraction=0.6, shifts=None, seed=5)
    cal.setup("fit")
    val = inner.val_dataset
    n = len(val)
    cal_idx, rest_idx = cal.calibration_indices, cal.heldout_indices
    assert len(cal_idx) == round(0.6 * n)
    assert len(cal.train_dataset) == len(cal_idx)
    assert len(cal.val_dataset) == n - len(cal_idx)
    assert set(cal_idx.tolist()).isdisjoint(rest_idx.tolist())
    assert sorted(cal_idx.tolist() + rest_idx.tolist()) == list(range(n))
    # stratified: every class keeps its share of the validation set (up to rounding)
    val_counts = Counter(val.tensors[1].tolist())
    cal_counts = Counter(val.tensors[1][cal_idx].tolist())
    for c, count in val_counts.items():
        assert abs(cal_counts[c] - 0.6 * count) <= 1
    # disjoint from the test data, by position in the full set and by content
    full_positions = inner.val_indices[cal_idx]
    assert set(full_positions.tolist()).isdisjoint(inner.test_indices.tolist())
    cal_images = torch.stack([cal.train_dataset[i][0] for i in range(len(cal.train_dataset))])
    assert torch.equal(cal_images, val.tensors[0][cal_idx])
    cal.setup("test")
    test_images = inner.test_dataset.tensors[0]
    assert torch.equal(cal.test_datasets[0].dataset.tensors[0], test_images)
    # a pure function of the seed
    again = CalibrationDataModule(DigitsDataModule(seed=1), 0.6, shifts=None, seed=5)
    again.setup("fit")
    assert torch.equal(again.calibration_indices, cal_idx)
    other = CalibrationDataModule(DigitsDataModule(seed=1), 0.6, shifts=None, seed=6)
    other.setup("fit")
    assert not torch.equal(other.calibration_indices, cal_idx)


def test_calibration_loaders_end_to_end():
    inner = DigitsDataModule(seed=0)
    extra = TensorDataset(torch.randn(7, 1, 8, 8), torch.arange(7) % 10)
    extra.class_subset = [0, 1, 2, 3, 4, 5, 6]
    cal = CalibrationDataModule(
        inner,
        calibration_fraction=0.5,
        shifts=("gaussian_noise", "contrast"),
        severities=(1, 5),
        ood_datasets={"noise-images": extra},
        batch_size=16,
        seed=0,
    )
    cal.setup()
    expected = ["id", "gaussian_noise-1", "gaussian_noise-5", "contrast-1", "contrast-5"]
    assert cal.test_set_names == [*expected, "noise-images"]
    assert cal.test_class_subsets == [None] * 5 + [[0, 1, 2, 3, 4, 5, 6]]

    train = cal.train_dataloader()
    assert isinstance(train.sampler, EpochSeededRandomSampler)
    assert train.sampler.seed == 0
    images, views, labels = next(iter(train))
    assert images.shape == (16, 1, 8, 8)
    assert views.shape == (16, 3, 1, 8, 8)
    assert labels.shape == (16,) and labels.dtype == torch.int64
    val_images, _, _ = next(iter(cal.val_dataloader()))
    assert torch.equal(val_images, inner.val_dataset.tensors[0][cal.heldout_indices[:16]])

    loaders = cal.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == len(cal.test_set_names)
    test = inner.test_dataset
    firsts = [next(iter(loader)) for loader in loaders]
    assert torch.equal(firsts[0][0], test.tensors[0][:16])
    for name, batch in zip(cal.test_set_names[1:5], firsts[1:5]):
        corruption, severity = name.rsplit("-", 1)
        shifted = CorruptedDataset(test, corruption, int(severity), seed=0)
        assert torch.equal(batch[0], _images(shifted, 16))
        assert torch.equal(batch[2], test.tensors[1][:16])
        # the views are views of the corrupted images
        views_of_shifted = ViewsDataset(shifted, cal.view_transforms, seed=0)
        assert torch.equal(batch[1][3], views_of_shifted[3][1])
    assert torch.equal(firsts[5][0], extra.tensors[0])
    assert firsts[5][1].shape == (7, 3, 1, 8, 8)
    # default views of standard-normalised digits run on the un-normalised image
    assert all(isinstance(t, Denormalized) for t in cal.view_transforms)


def test_calibration_without_views_and_full_fraction():
    cal = CalibrationDataModule(
        DigitsDataModule(normalize="symmetric"),
        calibration_fraction=1.0,
        views=False,
        shifts=["rotation"],
        severities=[2],
        batch_size=8,
    )
    assert cal.num_views == 0
    cal.setup()
    assert cal.val_dataset is cal.train_dataset
    assert len(cal.train_dataset) == len(cal.datamodule.val_dataset)
    assert len(cal.heldout_indices) == 0
    batch = next(iter(cal.train_dataloader()))
    assert len(batch) == 2 and batch[0].shape == (8, 1, 8, 8)
    assert cal.test_set_names == ["id", "rotation-2"]
    assert all(len(next(iter(loader))) == 2 for loader in cal.test_dataloader())
    with_views = CalibrationDataModule(DigitsDataModule(normalize="symmetric"), shifts=None)
    with_views.setup("fit")
    assert all(isinstance(t, MinMaxRescaled) for t in with_views.view_transforms)


class _ValidatesOnTest(L.LightningDataModule):
    num_classes = 3
    image_shape = (1, 4, 4)

    def setup(self, stage=None):
        self.test_dataset = TensorDataset(torch.randn(12, 1, 4, 4), torch.arange(12) % 3)
        self.val_dataset = self.test_dataset


class _NoTargets(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.full((1, 4, 4), float(i)), i % 3


def test_dataset_targets_fallbacks():
    assert dataset_targets(_NoTargets()).tolist() == [i % 3 for i in range(30)]
    subset = torch.utils.data.Subset(TensorDataset(torch.zeros(5, 1), torch.arange(5)), [4, 1])
    assert dataset_targets(subset).tolist() == [4, 1]


def test_calibration_errors():
    dm = DigitsDataModule()
    with pytest.raises(ValueError, match="datamodule"):
        CalibrationDataModule(object())
    for fraction in (0.0, 1.5, True):
        with pytest.raises(ValueError, match=r"calibration_fraction must be a float in \(0, 1\]"):
            CalibrationDataModule(dm, calibration_fraction=fraction)
    with pytest.raises(ValueError, match="shifts"):
        CalibrationDataModule(dm, shifts=["fog"])
    with pytest.raises(ValueError, match="shifts"):
        CalibrationDataModule(dm, shifts="rotation")
    with pytest.raises(ValueError, match="severities"):
        CalibrationDataModule(dm, severities=(0, 1))
    with pytest.raises(ValueError, match="view_transforms"):
        CalibrationDataModule(dm, view_transforms=[])
    with pytest.raises(ValueError, match="ood_datasets"):
        CalibrationDataModule(dm, ood_datasets={"id": TensorDataset(torch.zeros(1))})
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationDataModule(dm, batch_size=0)
    with pytest.raises(ValueError, match="disjoint"):
        CalibrationDataModule(_ValidatesOnTest()).setup("fit")
    with pytest.raises(ValueError, match="calibration_fraction"):
        CalibrationDataModule(dm, calibration_fraction=0.01).setup("fit")


class _Recorder(L.LightningModule):
    """Counts the test batches per loader; a linear classifier stands in for a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.seen: Counter = Counter()

    def training_step(self, batch, batch_idx):
        images, views, labels = batch
        logits = self.net(torch.cat([images, views.flatten(0, 1)]))
        return nn.functional.cross_entropy(logits[: len(labels)], labels)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        images, views, labels = batch
        self.seen[dataloader_idx] += len(labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_calibration_datamodule_runs_in_a_trainer():
    cal = CalibrationDataModule(
        DigitsDataModule(), shifts=["contrast"], severities=[1], batch_size=64
    )
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, limit_test_batches=2
    )
    model = _Recorder()
    trainer.fit(model, datamodule=cal)
    trainer.test(model, datamodule=cal, verbose=False)
    assert dict(model.seen) == {0: 128, 1: 128}


def _fake_classifier(images, views):
    """Logits from pixel sums: cheap, deterministic, different per view."""
    logits = images.flatten(1)[:, :10] * 2.0
    if views is None:
        return logits, None
    n, v = views.shape[:2]
    return logits, views.flatten(0, 1).flatten(1)[:, :10].view(n, v, 10).transpose(0, 1)


def test_cache_outputs_serves_classifier_outputs_in_the_same_order():
    cal = CalibrationDataModule(DigitsDataModule(), shifts=None, batch_size=32, seed=2)
    with pytest.raises(RuntimeError, match="setup"):
        cal.cache_outputs(_fake_classifier)
    cal.setup("fit")
    image_batch = next(iter(cal.train_dataloader()))
    cal.cache_outputs(_fake_classifier, device="cpu")
    train = cal.train_dataloader()
    assert isinstance(train.sampler, EpochSeededRandomSampler) and train.sampler.seed == 2
    batch = next(iter(train))
    assert set(batch) == {"logits", "view_logits", "labels"}
    logits, view_logits = _fake_classifier(image_batch[0], image_batch[1])
    assert torch.equal(batch["labels"], image_batch[2])
    assert torch.allclose(batch["logits"], logits)
    assert batch["view_logits"].shape == (3, 32, 10)
    assert torch.allclose(batch["view_logits"], view_logits)
    val = next(iter(cal.val_dataloader()))
    assert torch.equal(
        val["labels"], cal.datamodule.val_dataset.tensors[1][cal.heldout_indices[:32]]
    )
    cal.setup("test")
    assert len(next(iter(cal.test_dataloader()[0]))) == 3  # test sets keep serving images
    cal.clear_cache()
    assert len(next(iter(cal.train_dataloader()))) == 3
    # without views, or with a classifier output that ignores them
    plain = CalibrationDataModule(DigitsDataModule(), 1.0, views=False, shifts=None)
    plain.setup("fit")
    plain.cache_outputs(_fake_classifier)
    assert plain.cached["val"] is plain.cached["train"]
    assert set(next(iter(plain.train_dataloader()))) == {"logits", "labels"}


def _same_settings(cache: Path, seed: int = 1) -> CalibrationDataModule:
    return CalibrationDataModule(DigitsDataModule(), shifts=("contrast",), severities=(5,),
                                 batch_size=50, seed=seed, output_cache=str(cache))  # fmt: skip


def test_cache_test_outputs_serve_the_image_loaders_batches_and_share_them_on_disk(
    tmp_path, monkeypatch
):
    cal = _same_settings(tmp_path)
    with pytest.raises(RuntimeError, match="setup"):
        cal.cache_test_outputs(_fake_classifier)
    cal.setup("test")
    image_loaders = cal.test_dataloader()
    cal.cache_test_outputs(_fake_classifier, key="classifier-a")
    (path,) = tmp_path.glob("*.safetensors")
    cached_loaders = cal.test_dataloader()
    assert len(cached_loaders) == len(image_loaders) == 2
    for images, cached in zip(image_loaders, cached_loaders):
        pairs = list(zip(images, cached, strict=True))  # the same number of batches
        for (x, views, y), batch in pairs:
            logits, view_logits = _fake_classifier(x, views)
            assert torch.equal(batch["labels"], y)
            assert torch.equal(batch["logits"], logits)
            assert torch.equal(batch["view_logits"], view_logits)  # (V, B, C) as computed

    # Another module with the same settings reads the file instead of computing.
    other = _same_settings(tmp_path)
    other.setup("test")
    with monkeypatch.context() as patched:
        patched.setattr(CalibrationDataModule, "_run", lambda *a: pytest.fail("recomputed"))
        other.cache_test_outputs(_fake_classifier, key="classifier-a")
    for mine, theirs in zip(cal.cached_test, other.cached_test):
        assert torch.equal(mine.logits, theirs.logits)
        assert torch.equal(mine.view_logits, theirs.view_logits)
        assert torch.equal(mine.labels, theirs.labels)
    # Another classifier key or another seed: other files; the calibration split has its own.
    other.cache_test_outputs(_fake_classifier, key="classifier-b")
    reseeded = _same_settings(tmp_path, seed=2)
    reseeded.setup()
    reseeded.cache_test_outputs(_fake_classifier, key="classifier-a")
    reseeded.cache_outputs(_fake_classifier, key="classifier-a")
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not list(tmp_path.glob("*.tmp"))
    # Without a key nothing is read or written; clear_cache goes back to images.
    reseeded.cache_test_outputs(_fake_classifier)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    reseeded.clear_cache()
    assert len(next(iter(reseeded.test_dataloader()[0]))) == 3

    # Bad input.
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        other.cache_test_outputs(_fake_classifier, key="classifier-a")
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        other.cache_test_outputs(_fake_classifier, key="")
    with pytest.raises(ValueError, match="output_cache must be None or a folder"):
        CalibrationDataModule(DigitsDataModule(), output_cache=5)
    with pytest.raises(ValueError, match="output_cache needs the default views"):
        CalibrationDataModule(DigitsDataModule(), view_transforms=[torch.flipud],
                              output_cache=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="no ood_datasets"):
        CalibrationDataModule(DigitsDataModule(), output_cache=str(tmp_path),
                              ood_datasets={"x": TensorDataset(torch.zeros(2, 1, 8, 8),
                                                               torch.zeros(2).long())})  # fmt: skip
