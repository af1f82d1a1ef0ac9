"""Issue 14 (bad inputs): NaN real images, overwritten teachers, bad sigmas, a last batch of 1,
fractional update ratios, foreign checkpoints, incomplete configs, truncated weight files."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.diffusion import EDMPrecond, load_denoiser
from lightning_losses.diffusion.checks import check_diffusion_images
from lightning_losses.modules import (
    ConsistencyDistillation,
    DiffInstructDistillation,
    DiffusionTeacher,
    DMDDistillation,
)
from tests.fakes import quiet_trainer
from tests.fakes import tiny_edm_teacher as tiny_teacher


class Images(L.LightningDataModule):
    """``num`` images in (-1, 1) (one NaN pixel in image ``nan_at`` when set), with labels."""

    def __init__(self, num: int = 8, batch_size: int = 4, nan_at: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = torch.tanh(torch.randn(num, 1, 8, 8, generator=g))
        if nan_at is not None:
            self.images[nan_at, 0, 3, 3] = float("nan")
        self.labels = torch.arange(num) % 4
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size)


# ------------------------------------------------------------------------------------------
# 1. NaN pixels


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_diffusion_images_refuses_non_finite_pixels_in_one_host_read(bad, monkeypatch):
    images = torch.zeros(2, 1, 8, 8)
    reads = []
    original = Tensor.tolist
    monkeypatch.setattr(Tensor, "tolist", lambda t: reads.append(1) or original(t))
    assert check_diffusion_images(images, 1, (8, 8)) is True  # all zeros: inside [0, 1]
    assert len(reads) == 1
    images[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"finite values in \[-1, 1\]"):
        check_diffusion_images(images, 1, (8, 8))


def test_teacher_and_consistency_refuse_a_batch_with_one_nan_pixel():
    with pytest.raises(ValueError, match="finite values"):
        teacher = DiffusionTeacher(in_channels=1, sample_size=8, channels=(8, 16))
        quiet_trainer(fast_dev_run=1).fit(teacher, Images(nan_at=1))
    with pytest.raises(ValueError, match="finite values"):
        model = ConsistencyDistillation(teacher=tiny_teacher())  # no EL
        quiet_trainer(fast_dev_run=1).fit(model, Images(nan_at=2))


# ------------------------------------------------------------------------------------------
# 6. a last batch of 1 with EL; a fractional update ratio


@pytest.mark.parametrize("cls", [DMDDistillation, ConsistencyDistillation])
def test_el_skips_a_last_batch_of_one_with_a_warning(cls):
    L.seed_everything(0)
    kwargs = {"fake_updates_per_generator": 1} if cls is DMDDistillation else {}
    model = cls(teacher=tiny_teacher(), el_weight=0.1, **kwargs)
    with pytest.warns(UserWarning, match="1 real image.*at least 2.*skipped"):
        quiet_trainer(max_epochs=2).fit(model, Images(num=9, batch_size=4))  # 4, 4, 1
    assert int(model.generator_steps) == 4  # two epochs of two steps, the batches of 1 skipped
    # without EL a batch of 1 trains
    model = cls(teacher=tiny_teacher(), **kwargs)
    quiet_trainer(max_epochs=1).fit(model, Images(num=9, batch_size=4))
    assert int(model.generator_steps) == 3


@pytest.mark.parametrize("value", [1.5, 0, True, "2"])
def test_fake_updates_per_generator_must_be_a_positive_int(value):
    for cls in (DMDDistillation, DiffInstructDistillation):
        with pytest.raises(ValueError, match="fake_updates_per_generator must be an integer"):
            cls(teacher=tiny_teacher(), fake_updates_per_generator=value)


# ------------------------------------------------------------------------------------------
# 6. a foreign checkpoint, an incomplete teacher config, truncated weights


def test_a_distillation_checkpoint_loaded_as_a_teacher_is_a_clear_error(tmp_path):
    L.seed_everything(0)
    model = DMDDistillation(teacher=tiny_teacher(), fake_updates_per_generator=1)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, Images())
    path = tmp_path / "dmd.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="not a DiffusionTeacher checkpoint.*DMDDistillation"):
        DiffusionTeacher.load_from_checkpoint(path)


@pytest.mark.parametrize("key", ["sigma_data", "sigma_min", "sigma_max", "class_conditional"])
def test_a_missing_key_in_the_teacher_config_is_named(tmp_path, key):
    folder = tiny_teacher().save_pretrained(tmp_path / "teacher")
    config = json.loads((folder / "edm_config.json").read_text())
    del config[key]
    (folder / "edm_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"lacks the key.*'{key}'"):
        load_denoiser(folder)


def test_a_truncated_weight_file_is_named(tmp_path):
    folder = tiny_teacher().save_pretrained(tmp_path / "teacher")
    (weights,) = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot read the UNet in .*unet.*{weights.name}"):
        load_denoiser(folder)
    (folder / "edm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="edm_config.json.*JSON"):
        load_denoiser(folder)


def test_edm_precond_round_trips_and_refuses_to_overwrite(tmp_path):
    teacher = tiny_teacher()
    folder = teacher.save_pretrained(tmp_path / "t")
    loaded = EDMPrecond.from_pretrained(folder)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values())
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        teacher.save_pretrained(folder)
    assert math.isclose(loaded.sigma_max, 80.0)


@pytest.mark.parametrize(
    "cls", [DMDDistillation, DiffInstructDistillation, ConsistencyDistillation]
)
def test_a_training_step_without_el_reads_one_value_back_to_the_host(cls, monkeypatch):
    """The real-image check is the only device-to-host read of a step (the optimizers' own step
    counters are CPU tensors, not device reads, and are not counted)."""
    import sys

    model = cls(teacher=tiny_teacher(), log_grad_norm_every=0)
    batch = (torch.tanh(torch.randn(4, 1, 8, 8)), torch.zeros(4, dtype=torch.long))
    for _ in range(2):
        model.train_step(batch)  # the counters are read once, then kept on the host
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        original = getattr(Tensor, name)

        def counted(t, *args, _original=original, **kwargs):
            if "torch/optim" not in sys._getframe(1).f_code.co_filename:
                reads.append(1)
            return _original(t, *args, **kwargs)

        monkeypatch.setattr(Tensor, name, counted)
    for _ in range(3):
        reads.clear()
        model.train_step(batch)
        assert len(reads) == 1


# ------------------------------------------------------------------------------------------
# 7. A training step's value checks (the real batch's range, EL's finiteness): one host read,
# before any update.


def _batch(nan_at: int | None = None) -> list[Tensor]:
    return next(iter(Images(num=8, batch_size=4, nan_at=nan_at).train_dataloader()))


def _count_tolist(monkeypatch) -> list[int]:
    reads: list[int] = []
    original = Tensor.tolist
    monkeypatch.setattr(Tensor, "tolist", lambda t: reads.append(1) or original(t))
    return reads


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (DMDDistillation, {"fake_updates_per_generator": 2}),
        (DiffInstructDistillation, {}),
        (ConsistencyDistillation, {}),
    ],
)
def test_a_step_with_el_reads_its_checks_once(cls, kwargs, monkeypatch):
    L.seed_everything(0)
    model = cls(teacher=tiny_teacher(), el_weight=0.5, **kwargs)
    batch = _batch()
    reads = _count_tolist(monkeypatch)
    for _ in range(4):  # DMD: fake-only and generator steps in turn
        reads.clear()
        logs = model.train_step(batch)
        assert len(reads) == 1, logs.keys()
    assert int(model.generator_steps) >= 2
    assert math.isfinite(float(logs["train/loss_el"]))
    # Outside a training step a queued check is read at once, as before.
    with pytest.raises(ValueError, match="real images must hold finite values"):
        model.check_real_images(_batch(nan_at=1)[0], defer=True)


def _parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_deferred_checks_raise_their_errors_before_any_update(monkeypatch):
    L.seed_everything(0)
    model = DMDDistillation(teacher=tiny_teacher(), el_weight=0.5, fake_updates_per_generator=1)
    before = _parameters(model)
    with pytest.raises(ValueError, match="real images must hold finite values"):
        model.train_step(_batch(nan_at=1))
    # An infinite generator output: EL's own error (the real batch passed), no update either.
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda z, labels=None: generate(z, labels) * math.inf)
    with pytest.raises(ValueError, match="generated"):
        model.train_step(_batch())
    after = _parameters(model)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert int(model.generator_steps) == 0 and model._pending_checks == []
