"""DiffInstructDistillation: its generator loss on the module's noise, noise levels, 1:1
schedule, EL, precision, DDP, and the configs (``diff_instruct_loss`` itself, against its
formula: tests/losses/test_distillation.py)."""

from __future__ import annotations

import inspect
import math

import lightning as L
import pytest
import torch
import yaml

from lightning_losses.cli import main
from lightning_losses.datamodules import CIFAR10DataModule
from lightning_losses.diffusion import DiffusersEpsDenoiser, EDMPrecond, unet_for_images
from lightning_losses.modules import DiffInstructDistillation
from tests.fakes import tiny_edm_teacher as tiny_teacher
from tests.modules import distillation_helpers as dh

DIGITS_CONFIGS = [dh.CONFIGS / "digits_di.yaml", dh.CONFIGS / "digits_di_el.yaml"]
CIFAR_CONFIG = dh.CONFIGS / "cifar10_di_el.yaml"


# ------------------------------------------------------------------------------------------
# Fixtures (module level: DDP pickles them)


def di(teacher: EDMPrecond | None = None, **kwargs) -> DiffInstructDistillation:
    return DiffInstructDistillation(
        teacher=tiny_teacher() if teacher is None else teacher, **kwargs
    )


# ------------------------------------------------------------------------------------------
# DiffInstructDistillation: construction and noise levels


def test_defaults_are_the_references():
    model = di()
    assert model.fake_updates_per_generator == 1
    assert model.generator_sigma == 1.0 and (model.p_mean, model.p_std) == (-1.2, 1.2)
    assert model.grad_clip is None and model.fake_grad_clip is None
    generator_opt, fake_opt = model.configure_optimizers()
    for opt in (generator_opt, fake_opt):
        assert type(opt) is torch.optim.Adam
        assert opt.defaults["betas"] == (0.0, 0.999) and opt.defaults["weight_decay"] == 0
    assert {id(p) for g in generator_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.generator.parameters()
    }
    for kwargs, match in (
        ({"p_std": -0.1}, "p_std"),
        ({"p_std": float("inf")}, "p_std"),
        ({"p_mean": float("nan")}, "p_mean"),
        ({"p_mean": "a"}, "p_mean"),
        ({"el_weight": -1.0}, "el_weight"),
    ):
        with pytest.raises(ValueError, match=match):
            di(**kwargs)


def test_noise_levels_are_lognormal_before_clamping():
    model = di()
    model.seed_noise(0)
    n = 200_000
    log_sigma = model.sample_fake_sigma(n).double().log()
    # EDM's range [0.002, 80] is 4.2 / 4.6 standard deviations away: clamping is negligible
    assert abs(float(log_sigma.mean()) + 1.2) < 0.02  # standard error 1.2 / sqrt(n) = 0.003
    assert abs(float(log_sigma.std()) - 1.2) < 0.02
    generator_levels = model.sample_generator_sigma(n).double().log()
    assert abs(float(generator_levels.mean()) + 1.2) < 0.02
    assert abs(float(generator_levels.std()) - 1.2) < 0.02
    # p_mean / p_std are honoured
    other = di(p_mean=0.5, p_std=0.3)
    other.seed_noise(0)
    log_other = other.sample_sigma(n).double().log()
    assert abs(float(log_other.mean()) - 0.5) < 0.01 and abs(float(log_other.std()) - 0.3) < 0.01


def test_noise_levels_are_clamped_into_the_teachers_range():
    low, high = 0.1, 1.0
    model = di(tiny_teacher(sigma_min=low, sigma_max=high))
    model.seed_noise(1)
    n = 200_000
    for sigma in (model.sample_fake_sigma(n), model.sample_generator_sigma(n)):
        assert sigma.dtype == torch.float32 and sigma.shape == (n,)
        assert float(sigma.min()) == pytest.approx(low) and float(sigma.max()) == pytest.approx(
            high
        )
        normal = torch.distributions.Normal(-1.2, 1.2)
        below = float(normal.cdf(torch.tensor(math.log(low))))  # 0.179
        above = 1 - float(normal.cdf(torch.tensor(math.log(high))))  # 0.159
        assert float((sigma == torch.tensor(low)).double().mean()) == pytest.approx(below, abs=0.01)
        assert float((sigma == torch.tensor(high)).double().mean()) == pytest.approx(
            above, abs=0.01
        )


def test_generator_loss_matches_the_formula_on_the_module_noise():
    model = di()
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    model.seed_noise(5)
    loss, logs = model.base_generator_loss(x, None)
    assert set(logs) == {"train/di_difference"} and float(logs["train/di_difference"]) == 0
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() == 0  # fake == teacher at the start: no Diff-Instruct gradient yet

    with torch.no_grad():  # move the fake denoiser away from the teacher
        for p in model.fake_denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.seed_noise(5)
    loss, _ = model.base_generator_loss(x, None)
    model.seed_noise(5)
    sigma = model.sample_generator_sigma(4)
    noisy = x.detach() + sigma.view(-1, 1, 1, 1) * model.randn(4, 1, 8, 8)
    with torch.no_grad():
        real = model.teacher(noisy, sigma)
        fake = model.fake_denoiser(noisy, sigma)
    torch.testing.assert_close(loss, ((fake - real) * x.detach()).sum() / 4)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, (fake - real) / 4, rtol=0, atol=0)
    assert grad.abs().max() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.fake_denoiser.parameters())


# ------------------------------------------------------------------------------------------
# Training


def test_one_to_one_schedule_moves_every_network_every_step():
    L.seed_everything(0)
    model = di(ema_decay=0.9)
    teacher_before, fake_before = dh.state(model.teacher), dh.state(model.fake_denoiser)
    ema_before = dh.state(model.generator_ema)
    recorder = dh.Recorder()
    trainer = dh.fit(model, dh.TinyImages(num=40), callbacks=[recorder])  # 5 training steps
    assert recorder.counters == [(n, n) for n in range(1, 6)]
    assert (int(model.fake_steps), int(model.generator_steps)) == (5, 5)
    assert trainer.global_step == 10  # Lightning counts both optimizers' steps
    # the generator is updated before the fake denoiser: at the first step the fake denoiser is
    # still the teacher, the Diff-Instruct gradient is exactly 0 and Adam leaves it in place
    moved = [dh.changed(a, b) for a, b in zip(recorder.after, [recorder.start] + recorder.after)]
    assert moved == [False, True, True, True, True]
    assert dh.changed(dh.state(model.fake_denoiser), fake_before)
    assert dh.changed(dh.state(model.generator_ema), ema_before)
    dh.assert_same(dh.state(model.teacher), teacher_before)
    logs = recorder.metrics[-1]
    for key in ("train/loss_fake", "train/loss_generator", "train/loss_base"):
        assert math.isfinite(logs[key]), key


def test_el_changes_only_the_generator_objective():
    # the objective itself: same x, same noise, EL on vs off
    teacher = tiny_teacher()
    off, on = di(teacher, el_weight=0.0), di(teacher, el_weight=2.5)
    real = torch.tanh(torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    with torch.no_grad():  # a fake denoiser that differs from the teacher, the same in both
        for p_off, p_on in zip(off.fake_denoiser.parameters(), on.fake_denoiser.parameters()):
            p_off.add_(0.05 * torch.randn_like(p_off))
            p_on.copy_(p_off)
    off.seed_noise(7)
    on.seed_noise(7)
    objective_off = off.generator_objective(x, real)
    objective_on = on.generator_objective(x, real)
    assert objective_off.terms == {} and set(objective_on.terms) == {"el"}
    assert torch.equal(objective_on.base, objective_off.base)
    el = on.supplementary("el")(x, real)
    torch.testing.assert_close(objective_on.loss - objective_off.loss, 2.5 * el)
    (grad_on,) = torch.autograd.grad(objective_on.loss, x)
    (grad_off,) = torch.autograd.grad(objective_off.loss, x)
    (grad_el,) = torch.autograd.grad(el, x)
    torch.testing.assert_close(grad_on - grad_off, 2.5 * grad_el)

    # a training step from the same state: the fake denoiser's update is the same
    runs = dh.fit_el_off_and_on(  # one step each: generator, then fake
        lambda weight: di(el_weight=weight), 2.0, dh.TinyImages(num=8)
    )
    dh.assert_el_changes_only_the_generator_objective(runs, 2.0)


def test_fast_dev_run():
    L.seed_everything(0)
    model = di(el_weight=0.5)
    dh.fit(model, dh.TinyImages(num=16), fast_dev_run=True)
    assert (int(model.fake_steps), int(model.generator_steps)) == (1, 1)
    samples = model.sample(5)
    assert samples.shape == (5, 1, 8, 8) and torch.isfinite(samples).all()


def test_bf16_mixed_steps_stay_finite():
    L.seed_everything(0)
    model = di(el_weight=0.5, log_grad_norm_every=1)
    recorder = dh.Recorder()
    dh.fit(model, dh.TinyImages(num=24), precision="bf16-mixed", callbacks=[recorder])
    assert (int(model.fake_steps), int(model.generator_steps)) == (3, 3)
    for logs in recorder.metrics:
        for key, value in logs.items():
            if key == "train/grad_norm_ratio_el" and logs["train/grad_norm_base"] == 0.0:
                # Step 0, fake denoiser == teacher: zero DI gradient, the ratio is undefined.
                assert math.isnan(value)
                continue
            assert math.isfinite(value), key
    dh.assert_float32_finite(model.generator, model.fake_denoiser, model.generator_ema)


def test_ddp_two_processes_cpu():
    L.seed_everything(0)
    # The automatic EL weight reduces its gradient norms over the ranks (one weight for all).
    model = di(el_weight=0.5, el_weight_mode="auto")
    trainer = dh.fit_ddp(model, dh.TinyImages(num=24, batch_size=4))  # 3 steps on each rank
    assert (int(model.fake_steps), int(model.generator_steps)) == (3, 3)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_fake"]))


# ------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("config", DIGITS_CONFIGS, ids=lambda p: p.name)
def test_digits_configs_instantiate_with_a_tiny_teacher(config, tmp_path):
    cli = dh.instantiate_digits_config(config, tmp_path, DiffInstructDistillation)
    model = cli.model
    assert model.fake_updates_per_generator == 1
    assert (model.p_mean, model.p_std) == (-1.2, 1.2)
    generator_opt, fake_opt = model.configure_optimizers()
    for opt in (generator_opt, fake_opt):
        assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.0, 0.999)
    # 1:1 updates: max_steps counts two optimizer steps per training (= generator) step
    assert cli.trainer.max_steps % 2 == 0


def test_the_two_digits_configs_differ_only_in_el_weight_and_run_names():
    plain, _ = dh.assert_configs_differ_only_in_el_weight([p.name for p in DIGITS_CONFIGS])
    # as many generator steps as the DMD digits config (1200 = 1000 fake + 200 generator)
    dmd = yaml.safe_load((dh.CONFIGS / "digits_dmd.yaml").read_text())
    k = dmd["model"]["init_args"]["fake_updates_per_generator"]  # k fake + 1 generator steps
    dmd_generator_steps = dmd["trainer"]["max_steps"] // (k + 1)
    assert plain["trainer"]["max_steps"] // 2 == dmd_generator_steps


def test_el_config_fits_through_the_cli_and_reloads(tmp_path):
    model = dh.fit_config_and_reload(
        DIGITS_CONFIGS[1],
        tmp_path,
        DiffInstructDistillation,
        "--data.init_args.batch_size=32",
        "--trainer.max_steps=4",  # 2 training steps, 2 optimizer steps each
    )
    assert (int(model.fake_steps), int(model.generator_steps)) == (2, 2)
    assert model.el_weight > 0 and (model.p_mean, model.p_std) == (-1.2, 1.2)


def test_cifar10_config_has_the_papers_settings():
    config = yaml.safe_load(CIFAR_CONFIG.read_text())
    model = config["model"]
    assert model["class_path"] == "lightning_losses.modules.DiffInstructDistillation"
    args = model["init_args"]
    assert args["teacher_path"] == "data/ddpm-cifar10-32"
    (el,) = args["supplementary_losses"]  # EL composed, not the el_weight shorthand
    assert args["fake_updates_per_generator"] == 1 and el["init_args"]["weight"] > 0
    for name in ("generator_optimizer", "fake_optimizer"):
        assert args[name]["class_path"] == "torch.optim.Adam"
        assert args[name]["init_args"]["lr"] == 1e-5
        assert args[name]["init_args"]["betas"] == [0.0, 0.999]
    assert config["trainer"]["precision"] == "bf16-mixed"
    data = config["data"]
    assert data["class_path"] == "lightning_losses.datamodules.CIFAR10DataModule"
    assert data["init_args"]["batch_size"] == 128
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    fid = callbacks["lightning_losses.callbacks.FIDCallback"]
    assert (fid["feature"], fid["num_samples"], fid["every_n_steps"], fid["real"]) == (
        2048,
        10000,
        5000,
        "train",
    )
    grid = callbacks["lightning_losses.callbacks.SampleGridCallback"]
    assert (grid["num_samples"], grid["every_n_steps"]) == (64, 1000)


HAS_NORMALIZE = "normalize" in inspect.signature(CIFAR10DataModule.__init__).parameters


def test_cifar10_config_instantiates_with_a_tiny_ddpm_teacher(tmp_path):
    """Everything built (run=False) with a tiny DDPM pipeline folder as the teacher.

    FIDCallback(feature=2048) fetches the Inception weights when built (no network here), so a
    copy of the config gives it an nn.Flatten; the rest is the file's.
    """
    import diffusers

    torch.manual_seed(0)
    unet = unet_for_images(3, 8, (8, 16))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(
        tmp_path / "ddpm"
    )
    config = yaml.safe_load(CIFAR_CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("FIDCallback"):
            callback["init_args"]["feature"] = {"class_path": "torch.nn.Flatten"}
    if not HAS_NORMALIZE:  # until CIFAR10DataModule has the option
        del config["data"]["init_args"]["normalize"]
    (tmp_path / "cifar.yaml").write_text(yaml.safe_dump(config))
    args = dh.cli_args(tmp_path / "cifar.yaml", tmp_path / "ddpm", tmp_path)
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.init_args.root={tmp_path}"]
    cli = main(args=args, run=False)
    model = cli.model
    assert isinstance(model, DiffInstructDistillation)
    assert isinstance(model.teacher, DiffusersEpsDenoiser)
    assert model.image_shape == (3, 8, 8) and model.generator_sigma == 1.0
    generator_opt, fake_opt = model.configure_optimizers()
    for opt in (generator_opt, fake_opt):
        assert opt.defaults["lr"] == 1e-5 and opt.defaults["betas"] == (0.0, 0.999)
    # the DDPM table's range: every level of both losses inside it
    model.seed_noise(0)
    sigma = model.sample_sigma(10_000)
    teacher = model.teacher
    low, high = (torch.tensor(s).float() for s in (teacher.sigma_min, teacher.sigma_max))
    assert bool((sigma >= low).all() and (sigma <= high).all())
    assert cli.trainer.precision == "bf16-mixed"
    if HAS_NORMALIZE:
        assert cli.datamodule.normalize == "symmetric"  # the teacher takes [-1, 1] images
