"""DiffusionTeacher: the EDM objective, EMA, sampling, export, CLI config, resume, bf16, DDP."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_losses.diffusion import EDMPrecond
from lightning_losses.modules import DiffusionTeacher
from tests.fakes import DDP, ToyImages, assert_spawn_picklable

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "distillation" / "digits_teacher.yaml"
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
QUIET_ARGS = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY = {"channels": (8, 16), "sample_size": 8}
# Steps called without a Trainer: self.log warns and does nothing.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


class SymmetricImages(ToyImages):
    """Tiny 1x8x8 images in (-1, 1) with class-dependent means; module level (picklable)."""

    def __init__(self, num: int = 32, num_classes: int = 4, batch_size: int = 8, seed: int = 0):
        super().__init__(num, num_classes, batch_size, seed)

    def make_images(self, noise: torch.Tensor) -> torch.Tensor:
        shift = self.labels.view(-1, 1, 1, 1) / self.num_classes - 0.5
        return torch.tanh(0.5 * noise + shift)


def _teacher(**kwargs) -> DiffusionTeacher:
    torch.manual_seed(kwargs.pop("seed", 0))
    return DiffusionTeacher(**{**TINY, **kwargs})


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_states_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------
# The objective and its checks


def test_edm_loss_falls_on_a_fixed_batch():
    teacher = _teacher()
    data = SymmetricImages(num=16)
    x = data.images
    optimizer = torch.optim.Adam(teacher.denoiser.parameters(), lr=3e-3)

    def fixed_loss() -> float:  # the same 8 noise draws per image each time
        with torch.no_grad():
            generator = torch.Generator().manual_seed(7)
            return teacher.compute_loss(x.repeat(8, 1, 1, 1), generator=generator).item()

    before = fixed_loss()
    for _ in range(30):
        optimizer.zero_grad()
        teacher.training_step((x, data.labels), 0).backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.9 * before, (before, after)  # about 0.8 here; untrained: 1.0


def test_training_step_is_the_edm_loss_of_the_denoiser():
    teacher = _teacher()
    x = SymmetricImages(num=8).images
    torch.manual_seed(3)
    loss = teacher.training_step(x, 0)
    torch.manual_seed(3)
    from lightning_losses.diffusion import edm_loss

    expected = edm_loss(teacher.denoiser, x, p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "transform,match",
    [
        (lambda x: 3 * x, 'normalize="symmetric"'),
        (lambda x: x - 1.5, r"\[-1, 1\]"),
        (lambda x: x.repeat(1, 3, 1, 1), "3 channels"),
        (lambda x: torch.nn.functional.interpolate(x, size=16), "sample_size"),
    ],
    ids=["scaled", "shifted", "channels", "size"],
)
def test_bad_images_raise_clear_errors(transform, match):
    teacher = _teacher()
    x = SymmetricImages(num=4).images
    with pytest.raises(ValueError, match=match):
        teacher.training_step((transform(x), torch.zeros(4, dtype=torch.long)), 0)
    with pytest.raises(ValueError, match=match):
        teacher.validation_step(transform(x), 0)


def test_standardised_digits_are_refused():
    from lightning_losses.datamodules import DigitsDataModule

    data = DigitsDataModule(normalize="standard", batch_size=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with pytest.raises(ValueError, match='DigitsDataModule\\(normalize="symmetric"\\)'):
        _teacher().training_step(batch, 0)


def test_unit_interval_data_warns():
    teacher = _teacher()
    with pytest.warns(UserWarning, match=r"\[0, 1\] data"):
        teacher.training_step(torch.rand(4, 1, 8, 8), 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"sample_steps": 0}, "sample_steps"),
        ({"class_conditional": True}, "num_classes"),
        ({"scheduler_interval": "batch"}, "scheduler_interval"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _teacher(**kwargs)


def test_given_unet_must_agree_with_class_conditional():
    from lightning_losses.diffusion import unet_for_images

    with pytest.raises(ValueError, match="class_conditional=True but the given unet"):
        DiffusionTeacher(unet_for_images(1, 8, (8, 16)), class_conditional=True, num_classes=3)
    with pytest.raises(ValueError, match="set class_conditional=True"):
        DiffusionTeacher(unet_for_images(1, 8, (8, 16), num_classes=3), num_classes=3)
    with pytest.raises(ValueError, match="num_classes=4"):
        unet = unet_for_images(1, 8, (8, 16), num_classes=3)
        DiffusionTeacher(unet, class_conditional=True, num_classes=4)


# ------------------------------------------------------------------------------------------
# EMA


def test_ema_matches_the_closed_form_for_known_weight_changes():
    decay = 0.8
    teacher = _teacher(ema_decay=decay)
    w0 = _state(teacher.denoiser)
    _assert_states_equal(_state(teacher.ema), w0)  # starts as a copy

    delta = {k: torch.full_like(v, 0.25) for k, v in w0.items()}
    with torch.no_grad():
        for name, param in teacher.denoiser.named_parameters():
            param.add_(delta[name])
    for _ in range(5):
        teacher.update_ema()
    # ema_5 = d^5 w0 + (1 - d^5) (w0 + delta) = w0 + (1 - d^5) delta
    expected = {k: w0[k] + (1 - decay**5) * delta[k] for k in w0}
    _assert_states_equal(_state(teacher.ema), expected, atol=1e-6)

    with torch.no_grad():
        for param in teacher.denoiser.parameters():
            param.sub_(1.0)
    for _ in range(3):
        teacher.update_ema()
    # ema_8 = d^3 ema_5 + (1 - d^3) (w0 + delta - 1)
    expected = {k: decay**3 * expected[k] + (1 - decay**3) * (w0[k] + delta[k] - 1.0) for k in w0}
    _assert_states_equal(_state(teacher.ema), expected, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.ema.parameters())


class _RecordWeights(L.Callback):
    """Snapshots the denoiser after every optimizer step (callbacks run before the module)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.seen:
            self.seen = trainer.global_step
            self.snapshots.append(_state(pl_module.denoiser))


def test_ema_is_updated_once_per_optimizer_step_in_a_fit():
    decay = 0.5
    teacher = _teacher(ema_decay=decay, optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    expected = _state(teacher.denoiser)
    recorder = _RecordWeights()
    trainer = L.Trainer(
        max_steps=3,
        accumulate_grad_batches=2,  # 6 batches, 3 optimizer steps, 3 EMA updates
        accelerator="cpu",
        limit_val_batches=0,
        callbacks=[recorder],
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(teacher, SymmetricImages(num=48, batch_size=8))
    assert len(recorder.snapshots) == 3
    for weights in recorder.snapshots:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    _assert_states_equal(_state(teacher.ema), expected, atol=1e-6)
    assert _max_difference(_state(teacher.ema), _state(teacher.denoiser)) > 1e-5


def test_optimizer_holds_only_the_trained_denoiser():
    teacher = _teacher()
    optimizer = teacher.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in teacher.denoiser.parameters()}
    assert trained.isdisjoint(id(p) for p in teacher.ema.parameters())


# ------------------------------------------------------------------------------------------
# Sampling and export


def test_sampling_shape_finite_and_reproducible():
    teacher = _teacher()
    a = teacher.sample(5, num_steps=3, generator=torch.Generator().manual_seed(1))
    b = teacher.sample(5, num_steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        teacher.sample(2, num_steps=2, class_labels=torch.tensor([0, 1]))


def test_sampling_uses_the_ema_weights():
    teacher = _teacher(ema_decay=0.0)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in teacher.denoiser.parameters():
            param.add_(0.05)
    before = teacher.sample(3, num_steps=2, noise=noise)
    assert not torch.equal(before, teacher.sample(3, num_steps=2, noise=noise, use_ema=False))
    teacher.update_ema()  # decay 0: the EMA becomes the trained weights
    torch.testing.assert_close(
        teacher.sample(3, num_steps=2, noise=noise),
        teacher.sample(3, num_steps=2, noise=noise, use_ema=False),
        rtol=0,
        atol=0,
    )


def test_class_conditional_sampling_needs_labels():
    teacher = _teacher(class_conditional=True, num_classes=3)
    assert teacher.denoiser.num_classes == 3 and teacher.class_conditional
    with torch.no_grad():  # give the (zero-initialised) class embedding an effect
        teacher.ema.unet.class_embedding.weight.normal_()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = teacher.sample(3, num_steps=3, class_labels=torch.tensor([0, 1, 2]), noise=noise)
    x1 = teacher.sample(3, num_steps=3, class_labels=torch.tensor([2, 2, 2]), noise=noise)
    assert x0.shape == (3, 1, 8, 8) and torch.isfinite(x0).all()
    assert not torch.allclose(x0, x1)
    with pytest.raises(ValueError, match="class conditional"):
        teacher.sample(3, num_steps=3)
    with pytest.raises(ValueError, match="no labels"):
        teacher.training_step(SymmetricImages(num=3).images, 0)


@pytest.mark.parametrize("num_classes", [None, 3], ids=["unconditional", "conditional"])
def test_save_pretrained_round_trip(tmp_path, monkeypatch, num_classes):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = _teacher(
        ema_decay=0.5,
        class_conditional=num_classes is not None,
        num_classes=num_classes,
        sigma_min=0.005,
        sigma_max=40.0,
    )
    with torch.no_grad():
        for param in teacher.denoiser.parameters():
            param.add_(0.1 * torch.randn_like(param))
    teacher.update_ema()  # the EMA now differs from both the start and the trained weights

    folder = teacher.save_pretrained(tmp_path / "teacher")
    assert (folder / "unet" / "config.json").is_file()
    assert list((folder / "unet").glob("*.safetensors"))
    config = json.loads((folder / "edm_config.json").read_text())
    assert config["sigma_data"] == 0.5 and config["num_classes"] == num_classes
    assert (config["sigma_min"], config["sigma_max"]) == (0.005, 40.0)
    assert config["class_conditional"] is (num_classes is not None)

    loaded = DiffusionTeacher.from_pretrained(folder)
    assert isinstance(loaded, EDMPrecond) and not loaded.training
    assert (loaded.sigma_min, loaded.sigma_max, loaded.num_classes) == (0.005, 40.0, num_classes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 30.0])
    labels = None if num_classes is None else torch.tensor([0, 1, 2, 0])
    teacher.eval()
    with torch.no_grad():
        expected = teacher.ema(x, sigma, labels)
        trained = teacher.denoiser(x, sigma, labels)
        torch.testing.assert_close(loaded(x, sigma, labels), expected, rtol=0, atol=0)
    assert (expected - trained).abs().max() > 1e-4  # it is the EMA that was exported


def test_from_pretrained_refuses_a_folder_without_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="edm_config.json"):
        DiffusionTeacher.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------
# Through the CLI and the Trainer


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_digits_teacher_config_fast_dev_run(tmp_path, conditional):
    from lightning_losses.cli import main  # here: DDP children import this file, keep it light

    cli = main(
        args=[
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.fast_dev_run=2",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks.dirpath={tmp_path}/checkpoints",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.class_conditional={str(conditional).lower()}",
            *QUIET_ARGS,
        ]
    )
    assert cli.trainer.state.finished
    model = cli.model
    assert isinstance(model, DiffusionTeacher)
    assert model.num_classes == 10  # linked from the data module
    assert model.class_conditional is conditional
    assert model.denoiser.num_classes == (10 if conditional else None)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss_ema"])


def test_checkpoint_restores_the_ema_exactly(tmp_path):
    def make() -> DiffusionTeacher:
        return _teacher(ema_decay=0.7, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))

    run = {"accelerator": "cpu", "limit_val_batches": 0, "default_root_dir": tmp_path, **QUIET}
    data = SymmetricImages(num=24, batch_size=8)  # 3 steps = one epoch
    teacher = make()
    trainer = L.Trainer(max_steps=3, enable_checkpointing=False, **run)
    trainer.fit(teacher, data)
    path = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(path)
    saved_ema = _state(teacher.ema)
    assert _max_difference(saved_ema, _state(teacher.denoiser)) > 1e-5

    loaded = DiffusionTeacher.load_from_checkpoint(path, weights_only=True)
    _assert_states_equal(_state(loaded.ema), saved_ema)
    assert loaded.ema_decay == 0.7 and loaded.hparams.channels == (8, 16)

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.ema = _state(pl_module.ema)
            self.weights = _state(pl_module.denoiser)

    resumed = make()
    capture = Capture()
    trainer = L.Trainer(max_steps=4, enable_checkpointing=False, callbacks=[capture], **run)
    trainer.fit(resumed, SymmetricImages(num=24, batch_size=8), ckpt_path=path)
    _assert_states_equal(capture.ema, saved_ema)
    # one more step: ema_4 = d * ema_3 + (1 - d) * weights_4
    expected = {k: 0.7 * saved_ema[k] + 0.3 * v for k, v in _state(resumed.denoiser).items()}
    _assert_states_equal(_state(resumed.ema), expected, atol=1e-6)


def test_bf16_mixed_fit_stays_finite():
    teacher = _teacher()
    start = _state(teacher.ema)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        precision="bf16-mixed",
        limit_val_batches=1,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(teacher, SymmetricImages(num=24, batch_size=8))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert all(torch.isfinite(p).all() for p in teacher.parameters())
    assert _max_difference(_state(teacher.ema), start) > 0
    assert torch.isfinite(teacher.sample(2, num_steps=2)).all()


def test_two_process_ddp_fit_runs():
    teacher = _teacher(ema_decay=0.5)
    start = _state(teacher.ema)
    data = SymmetricImages(num=32, batch_size=8)
    assert_spawn_picklable(teacher, data)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=2,
        strategy=DDP,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(teacher, data)
    assert torch.isfinite(trainer.callback_metrics["val/loss_ema"])
    ema = _state(teacher.ema)  # the weights come back from rank 0
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert _max_difference(ema, start) > 1e-6
    assert _max_difference(ema, _state(teacher.denoiser)) > 1e-6
