"""CIFAR-10-C files that are corrupt, of the wrong dtype or out of range: errors name the file."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_losses.datamodules.shifted_sets import CIFAR10CDataset
from lightning_losses.datamodules.shifts import CIFAR10CDataset as ReExported


def _folder(tmp_path, labels=None):
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(10) % 10 if labels is None else labels)
    return tmp_path


def test_re_exported_from_shifts():
    assert ReExported is CIFAR10CDataset


def test_a_valid_folder_loads(tmp_path):
    data = CIFAR10CDataset(_folder(tmp_path), "fog", 2, transform=lambda image: image)
    assert len(data) == 2 and data.targets == [2, 3]


def test_corrupt_npy_files_name_the_file(tmp_path):
    root = _folder(tmp_path)
    (root / "snow.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(ValueError, match=r"snow\.npy' is not a readable \.npy array file"):
        CIFAR10CDataset(root, "snow", 1, transform=lambda image: image)
    (root / "labels.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match=r"labels\.npy' is not a readable \.npy array file"):
        CIFAR10CDataset(root, "fog", 1, transform=lambda image: image)


def test_labels_must_be_integer_cifar10_classes(tmp_path):
    root = _folder(tmp_path, labels=np.zeros(10, np.float64))
    with pytest.raises(ValueError, match=r"labels\.npy' must hold integer class labels"):
        CIFAR10CDataset(root, "fog", 1, transform=lambda image: image)
    np.save(root / "labels.npy", np.full(10, 12, np.int64))
    with pytest.raises(ValueError, match=r"must hold CIFAR-10 labels in \[0, 9\], got values in"):
        CIFAR10CDataset(root, "fog", 1, transform=lambda image: image)
