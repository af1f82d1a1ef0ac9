"""Tests of lightning_losses.datamodules: digits, label noise, sampler, CIFAR and image folders.

CIFAR and image-folder modules are exercised on tiny files written in the real on-disk formats.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import quiet_trainer
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lightning_losses.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    EpochSeededRandomSampler,
    ImageFolderDataModule,
    IndexedDataset,
    LabelNoiseDataModule,
    NoisyLabelDataset,
    label_noise,
    pairflip_label_noise,
    stratified_split,
    symmetric_label_noise,
)

# --------------------------------------------------------------------------------------------
# sampler


def test_sampler_order_is_a_function_of_seed_and_epoch():
    data = list(range(50))
    a, b = EpochSeededRandomSampler(data, seed=3), EpochSeededRandomSampler(data, seed=3)
    assert isinstance(a, RandomSampler)
    assert len(a) == 50
    first = list(a)
    assert sorted(first) == data
    assert first != data
    assert list(a) == first  # no hidden state advances between iterations
    b.set_epoch(0)
    assert list(b) == first
    a.set_epoch(1)
    epoch1 = list(a)
    assert sorted(epoch1) == data
    assert epoch1 != first
    b.set_epoch(1)
    assert list(b) == epoch1
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert epoch1 == expected
    assert list(EpochSeededRandomSampler(data, seed=4)) != first


def test_sampler_does_not_touch_global_rng_and_rejects_bad_args():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    list(EpochSeededRandomSampler(list(range(10)), seed=1))
    assert torch.equal(torch.rand(3), before)
    with pytest.raises(ValueError, match="seed"):
        EpochSeededRandomSampler(list(range(3)), seed=1.5)
    with pytest.raises(ValueError, match="epoch"):
        EpochSeededRandomSampler(list(range(3))).set_epoch(-1)


class _RecordLabels(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(y.tolist())
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_sets_the_epoch_so_batches_follow_seed_plus_epoch():
    dm = DigitsDataModule(batch_size=16, seed=5)
    model = _RecordLabels()
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    targets = dm.train_dataset.tensors[1]
    for epoch in (0, 1):
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(5 + epoch))
        assert model.seen[epoch] == targets[order[:48]].tolist()
    assert model.seen[0] != model.seen[1]


# --------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    return dm


def test_digits_properties_before_setup():
    dm = DigitsDataModule(image_size=16)
    assert dm.num_classes == 10
    assert dm.image_shape == (1, 16, 16)
    assert dm.train_dataset is None
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_digits_split_sizes_disjoint_and_stratified(digits):
    n = 1797
    n_test, n_val = round(0.2 * n), round(0.15 * n)
    assert len(digits.test_dataset) == n_test
    assert len(digits.val_dataset) == n_val
    assert len(digits.train_dataset) == n - n_test - n_val
    parts = [set(digits.train_indices.tolist()), set(digits.val_indices.tolist())]
    parts.append(set(digits.test_indices.tolist()))
    assert sum(len(p) for p in parts) == n
    assert set().union(*parts) == set(range(n))
    overall = np.bincount(np.concatenate([d.tensors[1].numpy() for d in _splits(digits)]))
    for dataset in _splits(digits):
        counts = np.bincount(dataset.tensors[1].numpy(), minlength=10)
        expected = overall * len(dataset) / n
        assert np.all(np.abs(counts - expected) <= 1.0), (counts, expected)


def _splits(dm):
    return [dm.train_dataset, dm.val_dataset, dm.test_dataset]


def test_digits_items_and_loaders(digits):
    x, y = digits.train_dataset[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0
    # Built the way the Trainer builds it (recording the DataLoader's keyword arguments), the
    # loader must still read as shuffled, or DDP would swap in a non-shuffling sampler.
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = digits.train_dataloader()
        val_loader = digits.val_dataloader()
    assert isinstance(loader.sampler, EpochSeededRandomSampler)
    assert loader.sampler.seed == 0
    assert _is_dataloader_shuffled(loader)
    assert not _is_dataloader_shuffled(val_loader)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 8, 8) and yb.shape == (64,) and yb.dtype == torch.int64
    for eval_loader in (digits.val_dataloader(), digits.test_dataloader()):
        assert isinstance(eval_loader.sampler, SequentialSampler)
        assert not _is_dataloader_shuffled(eval_loader)
        assert not eval_loader.persistent_workers
    assert DigitsDataModule(num_workers=1).image_shape == (1, 8, 8)
    dm = DigitsDataModule(num_workers=1)
    dm.setup()
    assert dm.train_dataloader().persistent_workers  # built, not iterated


def test_digits_split_depends_only_on_seed(digits):
    same = DigitsDataModule(seed=0, image_size=16, normalize="none")
    same.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    assert torch.equal(same.train_indices, digits.train_indices)
    assert torch.equal(same.test_indices, digits.test_indices)
    assert not torch.equal(other.train_indices, digits.train_indices)
    assert not torch.equal(other.test_indices, digits.test_indices)


def test_digits_standard_normalisation_uses_train_statistics(digits):
    train = digits.train_dataset.tensors[0]
    assert abs(float(train.mean())) < 1e-5
    assert abs(float(train.std()) - 1.0) < 1e-5
    assert 0.2 < digits.mean < 0.4 and 0.3 < digits.std < 0.5
    test = digits.test_dataset.tensors[0]
    raw = DigitsDataModule(seed=0, normalize="none")
    raw.setup()
    expected = (raw.test_dataset.tensors[0] - digits.mean) / digits.std
    assert torch.allclose(test, expected, atol=1e-6)


def test_digits_symmetric_and_none_ranges():
    sym = DigitsDataModule(normalize="symmetric")
    sym.setup()
    none = DigitsDataModule(normalize="none")
    none.setup()
    for dataset in _splits(sym):
        assert float(dataset.tensors[0].min()) == -1.0 and float(dataset.tensors[0].max()) == 1.0
    for dataset in _splits(none):
        assert float(dataset.tensors[0].min()) == 0.0 and float(dataset.tensors[0].max()) == 1.0
    assert torch.allclose(sym.train_dataset.tensors[0], none.train_dataset.tensors[0] * 2 - 1)
    assert sym.mean is None


@pytest.mark.parametrize("size", [16, 32])
def test_digits_resize_is_bilinear_on_the_whole_set(size):
    small = DigitsDataModule(normalize="none")
    small.setup()
    big = DigitsDataModule(normalize="none", image_size=size)
    big.setup()
    assert big.image_shape == (1, size, size)
    assert big.train_dataset[0][0].shape == (1, size, size)
    assert next(iter(big.val_dataloader()))[0].shape == (64, 1, size, size)
    expected = F.interpolate(
        small.test_dataset.tensors[0], size=(size, size), mode="bilinear", align_corners=False
    )
    assert torch.allclose(big.test_dataset.tensors[0], expected, atol=1e-6)


def test_digits_label_noise_only_on_train(digits):
    noisy = DigitsDataModule(seed=0, label_noise=0.3)
    noisy.setup()
    n_train = len(digits.train_dataset)
    assert torch.equal(noisy.train_clean_targets, digits.train_dataset.tensors[1])
    labels = noisy.train_dataset.tensors[1]
    flipped = labels != noisy.train_clean_targets
    assert int(flipped.sum()) == round(0.3 * n_train)
    assert torch.equal(flipped, noisy.train_noise_mask)
    assert torch.equal(labels, symmetric_label_noise(noisy.train_clean_targets, 0.3, 10, seed=0))
    assert torch.equal(noisy.val_dataset.tensors[1], digits.val_dataset.tensors[1])
    assert torch.equal(noisy.test_dataset.tensors[1], digits.test_dataset.tensors[1])
    assert torch.equal(noisy.train_dataset.tensors[0], digits.train_dataset.tensors[0])
    assert int(digits.train_noise_mask.sum()) == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 12}, "image_size"),
        ({"normalize": "minmax"}, "normalize"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"val_label_noise": 1.0}, "val_label_noise"),
        ({"val_label_noise": -0.1}, "val_label_noise"),
        ({"noise_type": "asymmetric"}, "noise_type"),
        ({"return_indices": 1}, "return_indices"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


# --------------------------------------------------------------------------------------------
# label noise


@pytest.mark.parametrize(("n", "rate"), [(100, 0.2), (101, 0.35), (7, 0.5), (50, 0.0), (10, 0.99)])
def test_symmetric_label_noise_flips_exactly_round_rate_n(n, rate):
    labels = torch.arange(n) % 4
    original = labels.clone()
    noisy = symmetric_label_noise(labels, rate, 4, seed=1)
    assert torch.equal(labels, original)
    assert noisy.dtype == torch.int64 and noisy.shape == labels.shape
    assert int((noisy != labels).sum()) == round(rate * n)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 4


def test_symmetric_label_noise_deterministic_and_seed_dependent():
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a = symmetric_label_noise(labels, 0.4, 10, seed=7)
    assert torch.equal(a, symmetric_label_noise(labels, 0.4, 10, seed=7))
    b = symmetric_label_noise(labels, 0.4, 10, seed=8)
    assert not torch.equal(a != labels, b != labels)


def test_symmetric_label_noise_is_uniform_over_the_other_classes():
    num_classes, n = 5, 20000
    labels = torch.arange(n) % num_classes
    noisy = symmetric_label_noise(labels, 0.5, num_classes, seed=0)
    flipped = noisy != labels
    assert int(flipped.sum()) == n // 2
    # every true class is flipped at about the same rate
    for c in range(num_classes):
        rate_c = float(flipped[labels == c].float().mean())
        assert abs(rate_c - 0.5) < 0.03
    # and, given the true class, the new class is uniform over the 4 others
    pairs = Counter(zip(labels[flipped].tolist(), noisy[flipped].tolist()))
    expected = n / 2 / (num_classes * (num_classes - 1))
    assert all(a != b for a, b in pairs)
    assert len(pairs) == num_classes * (num_classes - 1)
    assert all(abs(count - expected) < 0.15 * expected for count in pairs.values())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4, dtype=torch.long), 1.0, 3), "rate"),
        ((torch.zeros(4, dtype=torch.long), -0.1, 3), "rate"),
        ((torch.zeros(4, dtype=torch.long), 0.5, 1), "num_classes"),
        ((torch.zeros(4), 0.5, 3), "integer"),
        ((torch.zeros(2, 2, dtype=torch.long), 0.5, 3), "1-D"),
        ((torch.tensor([0, 3]), 0.5, 3), "num_classes=3"),
    ],
)
def test_symmetric_label_noise_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        symmetric_label_noise(*args, seed=0)


def test_noisy_label_dataset_matches_the_tensor_function():
    labels = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(2))
    inputs = torch.randn(300, 3)
    wrapped = NoisyLabelDataset(TensorDataset(inputs, labels), rate=0.25, num_classes=6, seed=4)
    assert len(wrapped) == 300
    assert int(wrapped.flipped.sum()) == 75
    got = torch.stack([wrapped[i][1] for i in range(300)])
    assert got.dtype == torch.int64
    assert torch.equal(got, symmetric_label_noise(labels, 0.25, 6, seed=4))
    assert torch.equal(wrapped[5][0], inputs[5])

    class IntLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 300

        def __getitem__(self, i):
            return i, int(labels[i])

    plain = NoisyLabelDataset(IntLabels(), rate=0.25, num_classes=6, seed=4)
    items = [plain[i] for i in range(300)]
    assert all(isinstance(y, int) for _, y in items)
    assert [y for _, y in items] == got.tolist()
    with pytest.raises(ValueError, match="rate"):
        NoisyLabelDataset(IntLabels(), rate=1.5, num_classes=6)


def test_label_noise_datamodule_affects_only_train(digits):
    dm = LabelNoiseDataModule(DigitsDataModule(batch_size=32, seed=0), rate=0.4, seed=3)
    assert dm.num_classes == 10 and dm.image_shape == (1, 8, 8)
    dm.prepare_data()
    dm.setup("fit")
    clean = dm.clean_train_dataset
    assert torch.equal(clean.tensors[1], digits.train_dataset.tensors[1])
    noisy_labels = torch.stack([dm.train_dataset[i][1] for i in range(len(clean))])
    flipped = noisy_labels != clean.tensors[1]
    assert int(flipped.sum()) == round(0.4 * len(clean))
    assert torch.equal(flipped, dm.train_dataset.flipped)

    loader = dm.train_dataloader()
    assert loader.batch_size == 32
    assert isinstance(loader.sampler, EpochSeededRandomSampler)
    order = list(loader.sampler)
    seen = torch.cat([y for _, y in loader])
    assert torch.equal(seen, noisy_labels[order])
    assert dm.datamodule.train_dataset is clean  # the wrapped module is left clean
    assert torch.equal(
        next(iter(dm.datamodule.train_dataloader()))[1], clean.tensors[1][order[:32]]
    )

    val = torch.cat([y for _, y in dm.val_dataloader()])
    test = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(val, digits.val_dataset.tensors[1])
    assert torch.equal(test, digits.test_dataset.tensors[1])

    again = LabelNoiseDataModule(DigitsDataModule(seed=0), rate=0.4, seed=3)
    again.setup("fit")
    assert torch.equal(again.train_dataset.flipped, dm.train_dataset.flipped)
    other = LabelNoiseDataModule(DigitsDataModule(seed=0), rate=0.4, seed=4)
    other.setup("fit")
    assert not torch.equal(other.train_dataset.flipped, dm.train_dataset.flipped)


@pytest.mark.parametrize("n", [7, 100, 1001])
def test_pairflip_flips_exactly_round_rate_n_to_the_next_class(n):
    labels = torch.arange(n) % 5
    noisy = pairflip_label_noise(labels, 0.4, 5, seed=2)
    flipped = noisy != labels
    assert int(flipped.sum()) == round(0.4 * n)
    assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 5)
    assert torch.equal(noisy, label_noise(labels, 0.4, 5, seed=2, noise_type="pairflip"))
    # the same items as the symmetric draw of the same seed, only the target class differs
    assert torch.equal(flipped, symmetric_label_noise(labels, 0.4, 5, seed=2) != labels)
    assert torch.equal(symmetric_label_noise(labels, 0.4, 5, 2), label_noise(labels, 0.4, 5, 2))
    with pytest.raises(ValueError, match="noise_type"):
        label_noise(labels, 0.4, 5, seed=2, noise_type="pair")


def test_pairflip_transition_is_c_to_c_plus_one_for_every_class():
    labels = torch.arange(4000) % 10
    noisy = pairflip_label_noise(labels, 0.4, 10, seed=0)
    pairs = Counter(zip(labels[noisy != labels].tolist(), noisy[noisy != labels].tolist()))
    assert set(pairs) == {(c, (c + 1) % 10) for c in range(10)}
    assert all(abs(count - 160) < 45 for count in pairs.values())


@pytest.mark.parametrize("noise_type", ["symmetric", "pairflip"])
def test_digits_noise_types_and_optional_val_noise(digits, noise_type):
    dm = DigitsDataModule(seed=1, label_noise=0.4, noise_type=noise_type)
    dm.setup()
    clean = dm.train_clean_targets
    labels = dm.train_dataset.tensors[1]
    assert int((labels != clean).sum()) == round(0.4 * len(clean))
    assert torch.equal(labels, label_noise(clean, 0.4, 10, seed=1, noise_type=noise_type))
    assert int(dm.val_noise_mask.sum()) == 0  # off by default
    assert torch.equal(dm.val_dataset.tensors[1], dm.val_clean_targets)

    noisy_val = DigitsDataModule(
        seed=1, label_noise=0.4, noise_type=noise_type, val_label_noise=0.4
    )
    noisy_val.setup()
    assert torch.equal(noisy_val.train_dataset.tensors[1], labels)  # training draw unchanged
    val, val_clean = noisy_val.val_dataset.tensors[1], noisy_val.val_clean_targets
    assert torch.equal(val_clean, dm.val_dataset.tensors[1])
    assert int((val != val_clean).sum()) == round(0.4 * len(val_clean))
    assert torch.equal(val != val_clean, noisy_val.val_noise_mask)
    if noise_type == "pairflip":
        flipped = val != val_clean
        assert torch.equal(val[flipped], (val_clean[flipped] + 1) % 10)
    assert torch.equal(noisy_val.test_dataset.tensors[1], dm.test_dataset.tensors[1])


def test_training_batches_carry_sample_indices(digits):
    dm = DigitsDataModule(batch_size=32, seed=0, return_indices=True)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, IndexedDataset)
    assert isinstance(loader.sampler, EpochSeededRandomSampler)
    images, targets = dm.train_dataset.tensors
    seen = []
    for x, y, index in loader:
        assert index.dtype == torch.int64 and index.shape == y.shape
        assert torch.equal(x, images[index]) and torch.equal(y, targets[index])
        seen.append(index)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(targets)))
    assert len(next(iter(dm.val_dataloader()))) == 2  # only training batches carry them
    assert len(next(iter(digits.train_dataloader()))) == 2  # off by default


def test_label_noise_datamodule_pairflip_val_noise_and_indices():
    base = DigitsDataModule(batch_size=50, seed=0, return_indices=True)
    dm = LabelNoiseDataModule(base, rate=0.4, seed=3, noise_type="pairflip", val_label_noise=0.2)
    dm.setup("fit")
    clean_train = dm.clean_train_dataset.tensors[1]
    noisy_train = torch.stack([dm.train_dataset[i][1] for i in range(len(clean_train))])
    flipped = noisy_train != clean_train
    assert int(flipped.sum()) == round(0.4 * len(clean_train))
    assert torch.equal(noisy_train[flipped], (clean_train[flipped] + 1) % 10)
    for _, y, index in dm.train_dataloader():
        assert torch.equal(y, noisy_train[index])
    clean_val = dm.clean_val_dataset.tensors[1]
    val = torch.cat([y for _, y in dm.val_dataloader()])
    assert int((val != clean_val).sum()) == round(0.2 * len(clean_val))
    assert dm.datamodule.val_dataset is dm.clean_val_dataset  # the wrapped module stays clean
    assert torch.equal(torch.cat([y for _, y in base.val_dataloader()]), clean_val)
    test = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(test, base.test_dataset.tensors[1])


def test_indexed_dataset_passes_extra_fields():
    inner = TensorDataset(torch.randn(5, 2), torch.arange(5), torch.arange(5) * 10)
    item = IndexedDataset(inner)[3]
    assert len(item) == 4 and int(item[2]) == 3 and int(item[3]) == 30
    noisy = NoisyLabelDataset(IndexedDataset(inner), rate=0.99, num_classes=5, seed=0)
    x, y, index, extra = noisy[3]
    assert int(index) == 3 and int(y) != 3


def test_label_noise_datamodule_bad_arguments():
    with pytest.raises(ValueError, match="rate"):
        LabelNoiseDataModule(DigitsDataModule(), rate=1.0)
    with pytest.raises(ValueError, match="datamodule"):
        LabelNoiseDataModule(object(), rate=0.1)
    with pytest.raises(RuntimeError, match="setup"):
        LabelNoiseDataModule(DigitsDataModule(), rate=0.1).train_dataloader()
    with pytest.raises(ValueError, match="noise_type"):
        LabelNoiseDataModule(DigitsDataModule(), rate=0.1, noise_type="flip")
    with pytest.raises(ValueError, match="val_label_noise"):
        LabelNoiseDataModule(DigitsDataModule(), rate=0.1, val_label_noise=1.0)


def test_stratified_split_errors_name_the_argument():
    with pytest.raises(ValueError, match="val_size"):
        stratified_split([0, 1, 0, 1, 2, 2], 2, seed=0, name="val_size")
    with pytest.raises(ValueError, match="val_size"):
        stratified_split([0, 1], 2, seed=0, name="val_size")


# --------------------------------------------------------------------------------------------
# CIFAR, on tiny files in the real on-disk format


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, entry: dict) -> str:
    # The real files were pickled by Python 2 with str keys; torchvision reads them with
    # encoding="latin1" and str keys ("data", "labels"), which protocol 2 + str keys reproduces.
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return _md5(path)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _fake_cifar10(root: Path, monkeypatch, per_class_train: int = 10, per_class_test: int = 2):
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(10), per_class_train)
    data = _images(len(labels), seed=0)
    train_list = []
    for k, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        entry = {
            "batch_label": f"training batch {k} of 5",
            "labels": labels[chunk].tolist(),
            "data": data[chunk],
            "filenames": [f"img_{i}.png" for i in chunk],
        }
        train_list.append([f"data_batch_{k}", _dump(folder / f"data_batch_{k}", entry)])
    test_labels = np.tile(np.arange(10), per_class_test)
    test_entry = {
        "batch_label": "testing batch 1 of 1",
        "labels": test_labels.tolist(),
        "data": _images(len(test_labels), seed=1),
        "filenames": [f"test_{i}.png" for i in range(len(test_labels))],
    }
    test_md5 = _dump(folder / "test_batch", test_entry)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072}
    meta_md5 = _dump(folder / "batches.meta", meta)
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return data, labels


def _fake_cifar100(root: Path, monkeypatch):
    from torchvision.datasets import CIFAR100

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(100), 2)

    def entry(fine, seed):
        return {
            "filenames": [f"x_{i}.png" for i in range(len(fine))],
            "batch_label": "training batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": _images(len(fine), seed),
        }

    train_md5 = _dump(folder / "train", entry(labels, 2))
    test_md5 = _dump(folder / "test", entry(np.arange(100), 3))
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    meta_md5 = _dump(folder / "meta", meta)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", train_md5]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", test_md5]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": meta_md5})


def _eval_tensor(row: np.ndarray, mean, std) -> torch.Tensor:
    image = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_cifar10_symmetric_normalisation_for_diffusion(tmp_path, monkeypatch):
    data, _ = _fake_cifar10(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(
        root=str(tmp_path), num_workers=0, val_size=20, augment=False, normalize="symmetric"
    )
    dm.setup("fit")
    x, _ = dm.train_dataset[0]
    expected = _eval_tensor(data[dm.train_indices[0]], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(x, expected, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="normalize"):
        CIFAR10DataModule(root=str(tmp_path), normalize="minmax")


def test_cifar10_split_transforms_and_loaders(tmp_path, monkeypatch):
    data, labels = _fake_cifar10(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8, num_workers=0, val_size=20, seed=0)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    dm.prepare_data()  # download=False: nothing to do, nothing fetched
    dm.setup("fit")
    assert dm.test_dataset is None  # only the fit splits were built
    train, val = set(dm.train_indices), set(dm.val_indices)
    assert len(train) == 80 and len(val) == 20 and not train & val
    assert train | val == set(range(100))
    assert Counter(labels[sorted(val)].tolist()) == dict.fromkeys(range(10), 2)  # stratified

    # val uses the evaluation transform: deterministic and exactly ToTensor + Normalize
    x, y = dm.val_dataset[3]
    raw_index = dm.val_indices[3]
    assert y == labels[raw_index]
    assert torch.allclose(x, _eval_tensor(data[raw_index], dm.mean, dm.std), atol=1e-5)
    assert torch.equal(dm.val_dataset[3][0], x)

    # train is augmented: same item, different crops / flips
    xt, yt = dm.train_dataset[0]
    assert xt.shape == (3, 32, 32) and xt.dtype == torch.float32
    assert yt == labels[dm.train_indices[0]]
    torch.manual_seed(0)
    draws = [dm.train_dataset[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64
    assert isinstance(dm.train_dataloader().sampler, EpochSeededRandomSampler)
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)

    dm.setup("test")
    assert len(dm.test_dataset) == 20
    xs, ys = next(iter(dm.test_dataloader()))
    assert xs.shape == (8, 3, 32, 32) and ys.tolist() == list(range(8))

    same = CIFAR10DataModule(root=str(tmp_path), val_size=20, seed=0)
    same.setup("fit")
    other = CIFAR10DataModule(root=str(tmp_path), val_size=20, seed=1)
    other.setup("fit")
    assert same.val_indices == dm.val_indices
    assert other.val_indices != dm.val_indices


def test_cifar10_val_size_zero_validates_on_test(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=0, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 100
    assert dm.val_dataset is dm.test_dataset and len(dm.val_dataset) == 20


def test_cifar10_bad_val_size(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(root=str(tmp_path), val_size=-1)
    for bad in (5, 100):  # fewer than one per class / the whole training set
        with pytest.raises(ValueError, match="val_size"):
            CIFAR10DataModule(root=str(tmp_path), val_size=bad).setup("fit")


def test_cifar_missing_files_give_a_clear_error(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), val_size=10)
    dm.prepare_data()
    assert not (tmp_path / "nowhere").exists()  # no download without download=True
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        dm.setup("fit")
    assert "cifar-10-batches-py" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(root=str(tmp_path)).setup("test")


def test_cifar_corrupted_files_give_a_clear_error(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"broken")
    with pytest.raises(FileNotFoundError, match="corrupted"):
        CIFAR10DataModule(root=str(tmp_path), val_size=10).setup("fit")


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    _fake_cifar100(tmp_path, monkeypatch)
    dm = CIFAR100DataModule(root=str(tmp_path), val_size=100, num_workers=0, batch_size=50)
    assert dm.num_classes == 100 and dm.image_shape == (3, 32, 32)
    dm.setup()
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 100
    assert len(dm.test_dataset) == 100
    val_labels = sorted(int(dm.val_dataset[i][1]) for i in range(100))
    assert val_labels == list(range(100))
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (50, 3, 32, 32) and yb.tolist() == list(range(50))


def test_label_noise_wraps_cifar(tmp_path, monkeypatch):
    _, labels = _fake_cifar10(tmp_path, monkeypatch)
    base = CIFAR10DataModule(root=str(tmp_path), val_size=20, num_workers=0)
    dm = LabelNoiseDataModule(base, rate=0.25, seed=0)
    dm.setup("fit")
    clean = [int(labels[i]) for i in base.train_indices]
    noisy = [dm.train_dataset[i][1] for i in range(len(clean))]
    assert sum(a != b for a, b in zip(clean, noisy)) == 20
    assert [int(dm.val_dataset[i][1]) for i in range(20)] == labels[base.val_indices].tolist()


# --------------------------------------------------------------------------------------------
# image folders, on real PNG / JPEG files

_CLASSES = ["cat", "dog", "zebra"]


def _write_tree(root: Path, split: str, per_class: int, classes=_CLASSES) -> None:
    rng = np.random.default_rng(len(split))
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (40 + 7 * i, 48 + 5 * c)
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / f"{i}.{ext}")


def test_image_folder_splits_and_shapes(tmp_path):
    _write_tree(tmp_path, "train", 4)
    _write_tree(tmp_path, "val", 2)
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == _CLASSES  # before setup
    assert dm.image_shape == (3, 32, 32)
    dm.setup("fit")
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 6
    x, y = dm.train_dataset[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    xv, yv = dm.val_dataset[5]
    assert xv.shape == (3, 32, 32) and yv == 2
    assert torch.equal(dm.val_dataset[5][0], xv)  # eval transform is deterministic
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64
    assert isinstance(dm.train_dataloader().sampler, EpochSeededRandomSampler)
    dm.setup("test")
    assert len(dm.test_dataset) == 6  # test_dir=None: the val folder
    xs, ys = next(iter(dm.test_dataloader()))
    assert xs.shape == (4, 3, 32, 32) and ys.tolist() == [0, 0, 1, 1]


def test_image_folder_eval_transform_is_resize_then_center_crop(tmp_path):
    _write_tree(tmp_path, "train", 1)
    dm = ImageFolderDataModule(str(tmp_path), image_size=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    out = dm.eval_transform()(image)
    resized = image.resize((int(70 * 36 / 50), 36), Image.BILINEAR)
    assert resized.size == (50, 36)
    assert out.shape == (3, 32, 32)
    # undo Normalize and compare with the centre 32x32 of the resized image (same PIL resampling)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    back = (out * std + mean) * 255
    centre = torch.from_numpy(np.array(resized)[2:34, 9:41]).permute(2, 0, 1).float()
    assert (back - centre).abs().max() < 1e-3


def test_image_folder_val_from_train_and_test_dir(tmp_path):
    _write_tree(tmp_path, "train", 4)
    _write_tree(tmp_path, "holdout", 1)
    dm = ImageFolderDataModule(
        str(tmp_path), test_dir="holdout", image_size=24, val_from_train=0.25, num_workers=0
    )
    dm.setup()
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 3
    assert not set(dm.train_indices) & set(dm.val_indices)
    assert sorted(int(dm.val_dataset[i][1]) for i in range(3)) == [0, 1, 2]
    assert dm.val_dataset[0][0].shape == (3, 24, 24)
    assert len(dm.test_dataset) == 3  # from test_dir; no "val" folder needed
    again = ImageFolderDataModule(str(tmp_path), test_dir="holdout", val_from_train=0.25)
    again.setup("fit")
    assert again.val_indices == dm.val_indices


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        _ = ImageFolderDataModule(str(tmp_path)).num_classes
    _write_tree(tmp_path, "train", 2)
    _write_tree(tmp_path, "val", 1, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderDataModule(str(tmp_path), image_size=16).setup("fit")
    with pytest.raises(ValueError, match="val_from_train"):
        ImageFolderDataModule(str(tmp_path), val_from_train=1.0)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataModule(str(tmp_path), image_size=0)
