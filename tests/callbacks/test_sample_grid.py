"""SampleGridCallback: schedule, file names, grid geometry, pixel content, fixed noise.

Its DDP check (rank 0 writes each grid once) shares one 2-process run with FIDCallback's, in
tests/callbacks/test_fid.py::test_ddp_two_processes_report_the_one_process_value.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks import SampleGridCallback
from lightning_losses.diffusion import EDMPrecond, unet_for_images
from lightning_losses.modules import DMDDistillation
from tests.fakes import QUIET

PAD = 2  # torchvision's save_image default


class Images(L.LightningDataModule):
    """``num`` random 1x8x8 images in (-1, 1); module level so ddp_spawn can pickle it."""

    def __init__(self, num: int = 40, batch_size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.tanh(torch.randn(num, 1, 8, 8, generator=g))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=self.batch_size)


def tiny_dmd(**kwargs) -> DMDDistillation:
    torch.manual_seed(0)
    return DMDDistillation(teacher=EDMPrecond(unet_for_images(1, 8, (8, 16))).eval(), **kwargs)


def grid_size(n: int, nrow: int, side: int = 8) -> tuple[int, int]:
    """(width, height) of torchvision's grid: tiles of side + PAD, plus one PAD border."""
    rows = math.ceil(n / nrow)
    return (nrow * (side + PAD) + PAD, rows * (side + PAD) + PAD)


def test_grids_on_schedule_with_the_right_geometry_and_pixels(tmp_path):
    L.seed_everything(0)
    model = tiny_dmd(fake_updates_per_generator=1, ema_decay=0.5)
    grids = SampleGridCallback(num_samples=7, every_n_steps=2, dirpath=str(tmp_path), nrow=3)
    L.Trainer(**QUIET, max_epochs=1, callbacks=[grids]).fit(model, Images(num=40))  # 5 steps
    names = [p.name for p in grids.paths]
    assert names == ["step_000002.png", "step_000004.png", "step_000005.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names

    last = Image.open(grids.paths[-1])
    assert last.format == "PNG" and last.mode == "RGB"
    assert last.size == grid_size(7, 3) == (32, 32)
    # tile k holds sample k of the fixed noise, (x + 1) / 2 as 8-bit
    expected = model.sample(7, generator=torch.Generator().manual_seed(0))
    expected = ((expected.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    pixels = np.asarray(last)
    for k in range(7):
        top = PAD + (k // 3) * (8 + PAD)
        left = PAD + (k % 3) * (8 + PAD)
        tile = pixels[top : top + 8, left : left + 8]
        for channel in range(3):  # grey repeated to RGB
            np.testing.assert_array_equal(tile[..., channel], expected[k, 0].numpy())
    # the empty eighth tile and the padding stay black (make_grid's pad value 0)
    assert pixels[PAD + 2 * 10 :, PAD + 10 :].max() == 0
    # the generator moved between saves, so the grids differ
    assert grids.paths[0].read_bytes() != grids.paths[-1].read_bytes()


def test_same_noise_gives_identical_files_and_another_seed_does_not(tmp_path):
    model = tiny_dmd(fake_updates_per_generator=1)
    grids = SampleGridCallback(num_samples=5, seed=3)
    first = grids.save(model, 12, tmp_path / "a")
    second = grids.save(model, 12, tmp_path / "b")
    assert first.name == second.name == "step_000012.png"
    assert first.read_bytes() == second.read_bytes()
    assert Image.open(first).size == grid_size(5, math.ceil(math.sqrt(5)))
    other = SampleGridCallback(num_samples=5, seed=4).save(model, 12, tmp_path / "c")
    assert other.read_bytes() != first.read_bytes()
    assert grids.paths == [first, second]
    model.train()
    grids.save(model, 13, tmp_path / "a")
    assert model.training and model.generator.training  # the module's mode is restored


def test_default_folder_is_the_log_dir_or_root(tmp_path):
    model = tiny_dmd(fake_updates_per_generator=1)
    grids = SampleGridCallback(num_samples=4, every_n_steps=None)
    options = {**QUIET, "default_root_dir": str(tmp_path / "root"), "max_steps": 1}
    L.Trainer(**options, callbacks=[grids]).fit(model, Images(num=8))
    assert grids.paths == [tmp_path / "root" / "samples" / "step_000001.png"]

    grids = SampleGridCallback(num_samples=4, every_n_steps=None)
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer = L.Trainer(**{**options, "logger": logger}, callbacks=[grids])
    trainer.fit(tiny_dmd(fake_updates_per_generator=1), Images(num=8))
    assert grids.paths == [Path(logger.log_dir) / "samples" / "step_000001.png"]
    assert grids.paths[0].is_file()


def test_bad_arguments_and_modules_raise(tmp_path):
    for kwargs in ({"num_samples": 0}, {"every_n_steps": 0}, {"nrow": 0}, {"num_samples": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SampleGridCallback(**kwargs)
    with pytest.raises(TypeError, match="sample"):
        SampleGridCallback().save(nn.Linear(2, 2), 0, tmp_path)
    with pytest.raises(ValueError, match="dirpath"):
        SampleGridCallback().save(tiny_dmd(fake_updates_per_generator=1), 0)
