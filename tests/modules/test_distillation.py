"""OneStepDistillation / DMDDistillation: schedule, freezing, EL, EMA, checks, DDP, configs."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lightning_losses.diffusion import EDMPrecond, karras_sigmas, unet_for_images
from lightning_losses.modules import DMDDistillation, OneStepDistillation
from lightning_losses.modules.distillation import (
    TEACHER_COMMAND,
    GeneratorObjective,
    load_teacher,
)
from tests.fakes import quiet_trainer
from tests.fakes import tiny_edm_teacher as tiny_teacher
from tests.modules import distillation_helpers as dh

CONFIGS = [dh.CONFIGS / "digits_dmd.yaml", dh.CONFIGS / "digits_dmd_el.yaml"]


def dmd(teacher: EDMPrecond | None = None, **kwargs) -> DMDDistillation:
    return DMDDistillation(teacher=tiny_teacher() if teacher is None else teacher, **kwargs)


# ------------------------------------------------------------------------------------------
# Construction


def test_generator_and_fake_start_as_frozen_teacher_copies():
    teacher = tiny_teacher()
    model = dmd(teacher, el_weight=0.0)
    reference = dh.state(teacher)
    for network in (model.generator, model.fake_denoiser, model.generator_ema):
        dh.assert_same(dh.state(network), reference)
        assert all(
            p.data_ptr() not in {q.data_ptr() for q in teacher.parameters()}
            for p in network.parameters()
        )
    assert all(p.requires_grad for p in model.generator.parameters())
    assert all(p.requires_grad for p in model.fake_denoiser.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.generator_ema.parameters())
    model.train()
    assert not model.teacher.training and not model.generator_ema.training
    assert model.generator.training and model.fake_denoiser.training
    assert model.embedding_loss is None  # el_weight = 0 builds no EL module
    assert model.generator_sigma == teacher.sigma_max == 80.0
    # the DMD2 table: ascending Karras levels, the generator's 20..980 of 1000
    table = model.sigma_table
    expected = karras_sigmas(1000).flip(0).float()
    torch.testing.assert_close(table, expected)
    assert model.dm_index_range == (20, 980)


def test_bad_construction_raises():
    teacher = tiny_teacher()
    wrong = EDMPrecond(unet_for_images(3, 8, (8, 16)))
    with pytest.raises(ValueError, match="generator does not fit the teacher.*in_channels"):
        DMDDistillation(teacher=teacher, generator=wrong)
    with pytest.raises(ValueError, match="class_conditional=True but the teacher is uncond"):
        DMDDistillation(teacher=teacher, class_conditional=True)
    with pytest.raises(ValueError, match="set class_conditional=True"):
        DMDDistillation(teacher=tiny_teacher(num_classes=4))
    with pytest.raises(ValueError, match="num_classes=10"):
        DMDDistillation(teacher=tiny_teacher(num_classes=4), class_conditional=True, num_classes=10)
    with pytest.raises(ValueError, match="not both"):
        DMDDistillation(teacher=teacher, teacher_path="somewhere")
    with pytest.raises(ValueError, match="teacher must be"):
        DMDDistillation(teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fake_updates_per_generator"):
        DMDDistillation(teacher=teacher, fake_updates_per_generator=0)
    with pytest.raises(ValueError, match="dm_index_range"):
        DMDDistillation(teacher=teacher, dm_index_range=(20, 1000))
    with pytest.raises(ValueError, match="el_weight"):
        DMDDistillation(teacher=teacher, el_weight=-1.0)


def test_missing_teacher_folder_names_the_teacher_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits_teacher.yaml"):
        DMDDistillation(teacher_path=str(tmp_path / "nothing"))
    assert "configs/distillation/digits_teacher.yaml" in TEACHER_COMMAND


# ------------------------------------------------------------------------------------------
# Training behaviour


def test_teacher_never_changes_and_the_students_do():
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=1, el_weight=0.5, ema_decay=0.9)
    teacher_before, fake_before = dh.state(model.teacher), dh.state(model.fake_denoiser)
    generator_before, ema_before = dh.state(model.generator), dh.state(model.generator_ema)
    dh.fit(model, dh.TinyImages(num=24), max_steps=6)  # 3 training steps, each 2 optimizer steps
    dh.assert_same(dh.state(model.teacher), teacher_before)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training
    assert dh.changed(dh.state(model.generator), generator_before)
    assert dh.changed(dh.state(model.fake_denoiser), fake_before)
    assert dh.changed(dh.state(model.generator_ema), ema_before)


def test_step_counters_follow_the_two_time_scale_schedule():
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=3)
    recorder = dh.Recorder()
    trainer = dh.fit(model, dh.TinyImages(num=56), callbacks=[recorder])  # 7 training steps
    # training step t updates the generator iff (t + 1) % 3 == 0: t = 2 and 5
    assert recorder.counters == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
    assert (int(model.fake_steps), int(model.generator_steps)) == (7, 2)
    assert trainer.global_step == 9  # Lightning counts both optimizers' steps
    # the generator moves only on its own steps
    moved = [dh.changed(a, b) for a, b in zip(recorder.after, [recorder.start] + recorder.after)]
    assert moved == [False, False, True, False, False, True, False]


def test_ema_after_k_updates_equals_the_closed_form():
    L.seed_everything(0)
    decay, k = 0.6, 3
    model = dmd(fake_updates_per_generator=1, ema_decay=decay, el_weight=1.0)
    recorder = dh.Recorder()
    dh.fit(model, dh.TinyImages(num=8 * k), callbacks=[recorder])
    assert len(recorder.after) == k and dh.changed(recorder.after[-1], recorder.start)
    dh.assert_ema_of_the_recorded_weights(model.generator_ema, recorder, decay)
    # sample() uses the EMA, or the trained generator with use_ema=False
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        model.sample(3, generator=g), model.generate(z, None, model.generator_ema)
    )
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(
        model.sample(3, generator=g, use_ema=False), model.generate(z).detach()
    )


def test_el_changes_only_the_generator_objective():
    runs = dh.fit_el_off_and_on(  # one step each: generator, then fake
        lambda weight: dmd(fake_updates_per_generator=1, el_weight=weight),
        2.0,
        dh.TinyImages(num=8),
    )
    dh.assert_el_changes_only_the_generator_objective(runs, 2.0)


def test_auto_el_weight_holds_the_gradient_ratio():
    """el_weight_mode="auto": lambda = r * |d base/dx| / |d EL/dx|, no gradient through it."""
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=1, el_weight=0.3, el_weight_mode="auto")
    with torch.no_grad():  # move the fake denoiser off the teacher: a non-zero DMD gradient
        for p in model.fake_denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.seed_noise(0)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = model.generate(z)
    real = torch.tanh(torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    objective = model.generator_objective(x, real)
    (g_base,) = torch.autograd.grad(objective.base, x, retain_graph=True)
    (g_el,) = torch.autograd.grad(objective.terms["el"], x, retain_graph=True)
    weight = objective.logs["train/weight_el"]
    assert not weight.requires_grad
    assert float(weight) == pytest.approx(0.3 * float(g_base.norm() / g_el.norm()), rel=1e-5)
    (g_total,) = torch.autograd.grad(objective.loss, x)
    torch.testing.assert_close(g_total, g_base + weight * g_el)
    assert float((weight * g_el).norm() / g_base.norm()) == pytest.approx(0.3, rel=1e-5)
    assert float(objective.logs["train/grad_norm_ratio_el"]) == pytest.approx(0.3, rel=1e-5)


def test_auto_el_weight_in_training_logs_the_held_ratio():
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=2, el_weight=0.5, el_weight_mode="auto")
    recorder = dh.Recorder()
    dh.fit(model, dh.TinyImages(num=48), callbacks=[recorder])  # 3 generator steps
    ratios = [m["train/grad_norm_ratio_el"] for m in recorder.metrics if "train/weight_el" in m]
    assert ratios and all(r == pytest.approx(0.5, rel=1e-4) for r in ratios)
    with pytest.raises(ValueError, match="el_weight_mode"):
        dmd(el_weight=0.5, el_weight_mode="adaptive")


def test_output_gradient_norms_are_logged_every_n_generator_steps(monkeypatch):
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=1, el_weight=0.5, log_grad_norm_every=2)
    calls = []
    original = model.output_grad_norms

    def spy(x, objective):
        calls.append(int(model.generator_steps))
        return original(x, objective)

    monkeypatch.setattr(model, "output_grad_norms", spy)
    recorder = dh.Recorder()
    dh.fit(model, dh.TinyImages(num=40), callbacks=[recorder])  # 5 generator steps
    assert calls == [0, 2, 4]
    logs = recorder.metrics[-1]
    for key in ("train/grad_norm_base", "train/grad_norm_el", "train/grad_norm_ratio_el"):
        assert math.isfinite(logs[key]), key
    assert logs["train/grad_norm_el"] > 0
    ratio = 0.5 * logs["train/grad_norm_el"] / logs["train/grad_norm_base"]
    assert logs["train/grad_norm_ratio_el"] == pytest.approx(ratio, rel=1e-5)


def test_output_gradient_norms_are_the_gradients_at_x():
    model = dmd(el_weight=1.0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    base, el = (x**2).sum(), 3.0 * x.sum()
    norms = model.output_grad_norms(x, GeneratorObjective(base + el, base, {"el": el}, {}))
    torch.testing.assert_close(norms["train/grad_norm_base"], (2 * x).detach().norm())
    torch.testing.assert_close(
        norms["train/grad_norm_el"], torch.tensor(3.0 * math.sqrt(x.numel()))
    )
    assert x.grad is None  # only measured, nothing accumulated


def test_dmd_loss_matches_the_formula_on_the_module_noise():
    model = dmd(el_weight=0.0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    model.seed_noise(5)
    loss, logs = model.base_generator_loss(x, None)
    model.seed_noise(5)
    sigma = model.sample_dm_sigma(4)
    assert bool(((sigma >= model.sigma_table[20]) & (sigma <= model.sigma_table[980])).all())
    noisy = x.detach() + sigma.view(-1, 1, 1, 1) * model.randn(4, 1, 8, 8)
    with torch.no_grad():
        real = model.teacher(noisy, sigma)
        fake = model.fake_denoiser(noisy, sigma)
    g = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    torch.testing.assert_close(logs["train/dmd_difference"], (fake - real).abs().mean())
    # fake == teacher at the start: no distribution-matching gradient yet
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() == 0


# ------------------------------------------------------------------------------------------
# Data checks


def test_missing_real_batch_with_el_raises_and_without_el_runs():
    L.seed_everything(0)
    labels_only = dh.TinyImages(num=16, labels_only=True)
    with pytest.raises(ValueError, match="need REAL images"):
        dh.fit(dmd(el_weight=1.0), labels_only, fast_dev_run=1)
    model = dmd(el_weight=0.0, fake_updates_per_generator=1)
    dh.fit(model, labels_only, fast_dev_run=1)  # the batch gives only the sample count
    assert (int(model.fake_steps), int(model.generator_steps)) == (1, 1)


def test_real_data_outside_minus_one_one_or_of_wrong_shape_raises():
    loud, colour = dh.TinyImages(num=16), dh.TinyImages(num=16)
    loud.images = 3.0 * loud.images  # beyond [-1, 1]
    colour.images = colour.images.repeat(1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        dh.fit(dmd(el_weight=1.0), loud, fast_dev_run=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # also without EL: the data is wrong
        dh.fit(dmd(el_weight=0.0), loud, fast_dev_run=1)
    with pytest.raises(ValueError, match="3 channels but the teacher takes 1"):
        dh.fit(dmd(el_weight=1.0), colour, fast_dev_run=1)


# ------------------------------------------------------------------------------------------
# Trainer integration


def test_fast_dev_run_class_conditional():
    L.seed_everything(0)
    teacher = tiny_teacher(num_classes=4)
    model = DMDDistillation(
        teacher=teacher,
        num_classes=4,
        class_conditional=True,
        el_weight=0.1,
        fake_updates_per_generator=1,
    )
    dh.fit(model, dh.TinyImages(num=16), fast_dev_run=True)
    assert (int(model.fake_steps), int(model.generator_steps)) == (1, 1)
    samples = model.sample(5, class_labels=torch.tensor([0, 1, 2, 3, 0]))
    assert samples.shape == (5, 1, 8, 8) and torch.isfinite(samples).all()
    assert model.sample(3).shape == (3, 1, 8, 8)  # uniform labels
    with pytest.raises(ValueError, match="unconditional"):
        dmd().sample(2, class_labels=torch.tensor([0, 1]))


def test_bf16_mixed_steps_stay_finite():
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=1, el_weight=0.5, grad_clip=1.0, fake_grad_clip=1.0)
    recorder = dh.Recorder()
    dh.fit(model, dh.TinyImages(num=24), precision="bf16-mixed", callbacks=[recorder])
    assert int(model.generator_steps) == 3
    metrics = dict(recorder.metrics[-1])
    # Logged at generator step 0, where the fake denoiser is still the teacher: the DMD
    # gradient is exactly 0, so the EL / base ratio is undefined (NaN), not a huge number.
    assert metrics.pop("train/grad_norm_base") == 0.0
    assert math.isnan(metrics.pop("train/grad_norm_ratio_el"))
    for key, value in metrics.items():
        assert math.isfinite(value), key
    dh.assert_float32_finite(model.generator, model.fake_denoiser, model.generator_ema)


def test_ddp_two_processes_cpu():
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=2, el_weight=0.5)
    trainer = dh.fit_ddp(model, dh.TinyImages(num=32, batch_size=4))  # 4 steps on each rank
    assert (int(model.fake_steps), int(model.generator_steps)) == (4, 2)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_fake"]))


def test_checkpoint_resume_restores_counters_and_ema(tmp_path):
    L.seed_everything(0)
    model = dmd(fake_updates_per_generator=2, ema_decay=0.7)
    trainer = dh.fit(model, dh.TinyImages(num=32))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved_ema = dh.state(model.generator_ema)
    assert (int(model.fake_steps), int(model.generator_steps)) == (4, 2)

    resumed = dmd(fake_updates_per_generator=2, ema_decay=0.7)
    recorder = dh.Recorder()
    trainer = quiet_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(resumed, dh.TinyImages(num=32), ckpt_path=path)
    assert recorder.counters_at_start == (4, 2)
    dh.assert_same(recorder.ema_at_start, saved_ema)
    assert recorder.counters[0] == (5, 2) and recorder.counters[1] == (6, 3)
    assert (int(resumed.fake_steps), int(resumed.generator_steps)) == (8, 4)
    assert trainer.global_step == 12


# ------------------------------------------------------------------------------------------
# Loading the teacher, configs


def test_teacher_path_loads_the_exported_teacher(tmp_path):
    teacher = dh.export_tiny_teacher(tmp_path / "export")
    # the layout the configs' teacher_path holds: unet/ + this edm_config.json
    assert (tmp_path / "export" / "unet" / "config.json").is_file()
    assert json.loads((tmp_path / "export" / "edm_config.json").read_text()) == {
        "_class_name": "EDMPrecond",
        "sigma_data": 0.5,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "class_conditional": False,
        "num_classes": None,
        "in_channels": 1,
        "sample_size": 8,
    }
    loaded = load_teacher(tmp_path / "export")
    dh.assert_same(dh.state(loaded), dh.state(teacher))
    model = DMDDistillation(teacher_path=str(tmp_path / "export"))
    dh.assert_same(dh.state(model.generator), dh.state(teacher))
    assert model.hparams.teacher_path == str(tmp_path / "export")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_instantiate_with_a_tiny_teacher(config, tmp_path):
    cli = dh.instantiate_digits_config(config, tmp_path, DMDDistillation)
    assert cli.model.fake_updates_per_generator == 5


def test_el_config_fits_through_the_cli_and_reloads_without_arguments(tmp_path):
    model = dh.fit_config_and_reload(
        CONFIGS[1],
        tmp_path,
        DMDDistillation,
        "--model.init_args.fake_updates_per_generator=1",
        "--data.init_args.batch_size=32",
        "--trainer.max_steps=4",  # 2 training steps, 2 optimizer steps each
    )
    assert (int(model.fake_steps), int(model.generator_steps)) == (2, 2)
    assert model.el_weight > 0 and model.embedding_loss is not None
    assert isinstance(model.configure_optimizers()[0], torch.optim.AdamW)


def test_the_two_configs_differ_only_in_el_weight():
    dh.assert_configs_differ_only_in_el_weight([p.name for p in CONFIGS])


class ShrinkToZero(OneStepDistillation):
    """A framework without a fake denoiser (like consistency distillation): loss mean(x^2)."""

    def base_generator_loss(self, x, labels):
        return x.square().mean(), {"train/mean_square": x.detach().square().mean()}


def test_base_class_hooks_for_a_framework_without_fake_denoiser():
    L.seed_everything(0)
    model = ShrinkToZero(teacher=tiny_teacher(), el_weight=0.5)
    assert not hasattr(model, "fake_denoiser")
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)  # one optimizer
    recorder = dh.Recorder()
    trainer = dh.fit(model, dh.TinyImages(num=24), callbacks=[recorder])
    # without a fake denoiser every training step is a generator step
    assert recorder.counters == [(0, 1), (0, 2), (0, 3)] and trainer.global_step == 3
    logs = recorder.metrics[-1]
    assert logs["train/loss_base"] == pytest.approx(logs["train/mean_square"])
    expected = logs["train/loss_base"] + 0.5 * logs["train/loss_el"]
    assert logs["train/loss_generator"] == pytest.approx(expected, rel=1e-6)
    assert "train/loss_fake" not in logs
    with pytest.raises(NotImplementedError):
        OneStepDistillation(teacher=tiny_teacher()).base_generator_loss(
            torch.zeros(2, 1, 8, 8), None
        )
