"""Consistency distillation: ConsistencyPrecond, consistency_loss, the module, the export."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn

from lightning_losses.diffusion import (
    ConsistencyPrecond,
    Denoiser,
    DiffusersEpsDenoiser,
    consistency_sampler,
    consistency_scalings,
    consistency_timestep,
    heun_step,
    karras_sigmas,
    unet_for_images,
)
from lightning_losses.losses import (
    EmbeddingLoss,
    consistency_distance,
    consistency_loss,
    pseudo_huber_c,
)
from lightning_losses.modules import ConsistencyDistillation
from tests.fakes import DDP
from tests.fakes import tiny_edm_teacher as tiny_teacher
from tests.modules import distillation_helpers as dh

DIGITS_CONFIGS = [dh.CONFIGS / "digits_cm.yaml", dh.CONFIGS / "digits_cm_el.yaml"]
CIFAR_CONFIG = dh.CONFIGS / "cifar10_cm_el.yaml"


class FixedX0(Denoiser):
    """A 'teacher' whose denoiser ignores its input and returns a fixed batch x0."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__(sigma_min=0.002, sigma_max=80.0, in_channels=x0.shape[1], sample_size=8)
        self.register_buffer("x0", x0)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None):
        return self.x0.to(x.dtype).expand_as(x)


class RealImages(dh.TinyImages):
    """Sharper images (tanh of 2 N(0, 1)), 16 of them in batches of 8 by default."""

    def __init__(self, num: int = 16, batch_size: int = 8, labels_only: bool = False) -> None:
        super().__init__(num, batch_size, labels_only)

    def make_images(self, noise: Tensor) -> Tensor:
        return torch.tanh(2.0 * noise)


def cd(teacher: Denoiser | None = None, **kwargs) -> ConsistencyDistillation:
    return ConsistencyDistillation(teacher=tiny_teacher() if teacher is None else teacher, **kwargs)


def loud(model: ConsistencyPrecond, factor: float = 20.0) -> ConsistencyPrecond:
    """Scale the UNet's last layer so that f leaves [-1, 1] and clipping matters."""
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(factor)
        model.unet.conv_out.bias.mul_(factor)
    return model


# ------------------------------------------------------------------------------------------
# The parameterisation


def test_scalings_match_the_formulas_and_diffusers_and_the_boundary_holds_exactly():
    from diffusers import CMStochasticIterativeScheduler

    sigma = torch.tensor([0.002, 0.0031, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = consistency_scalings(sigma, sigma_data=0.5, sigma_min=0.002)
    for i, s in enumerate(sigma.tolist()):
        assert float(c_skip[i]) == pytest.approx(0.25 / ((s - 0.002) ** 2 + 0.25), rel=1e-14)
        assert float(c_out[i]) == pytest.approx((s - 0.002) * 0.5 / math.sqrt(s**2 + 0.25))
        assert float(c_in[i]) == pytest.approx(1 / math.sqrt(s**2 + 0.25), rel=1e-14)
        assert float(consistency_timestep(sigma[i])) == pytest.approx(250 * math.log(s))
    assert (float(c_skip[0]), float(c_out[0])) == (1.0, 0.0)
    scheduler = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(c_skip, ref_skip, rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, ref_out, rtol=1e-14, atol=0)
    ref_t = torch.from_numpy(scheduler.sigma_to_t(sigma.numpy()))
    torch.testing.assert_close(consistency_timestep(sigma), ref_t, rtol=1e-14, atol=0)

    torch.manual_seed(0)
    model = loud(ConsistencyPrecond(unet_for_images(1, 8, (8, 16))))
    x = 3 * torch.randn(3, 1, 8, 8)
    for dtype in (torch.float32, torch.float64):
        for sigma_min in (0.002, torch.full((3,), 0.002, dtype=dtype)):
            assert torch.equal(model(x.to(dtype), sigma_min), x.to(dtype))  # f(x, s_min) = x
    # elsewhere: c_skip x + c_out F(c_in x; 250 ln sigma), rebuilt in float64 from the UNet
    levels = torch.tensor([0.3, 2.0, 80.0])
    out = model(x, levels)
    skip, c_out, scale = (c.view(-1, 1, 1, 1) for c in consistency_scalings(levels.double()))
    with torch.no_grad():
        unet_out = model.unet((scale * x.double()).float(), 250 * levels.double().log()).sample
    expected = skip * x.double() + c_out * unet_out.double()
    assert expected.abs().max() > 1  # the loud UNet: large outputs, f is not clipped
    torch.testing.assert_close(
        out.double(), expected, rtol=1e-5, atol=5e-5
    )  # float32 UNet, outputs > 1


def test_precond_refuses_unfit_unets_and_sigmas():
    from diffusers import UNet2DModel

    with pytest.raises(ValueError, match="out_channels == in_channels"):
        # the tiny UNet with 2 output channels for its 1 input channel
        two_out = UNet2DModel.from_config(unet_for_images(1, 8, (8, 16)).config, out_channels=2)
        ConsistencyPrecond(two_out)
    with pytest.raises(ValueError, match="sigma_data must be > 0"):
        ConsistencyPrecond(unet_for_images(1, 8, (8, 16)), sigma_data=0.0)
    model = ConsistencyPrecond(unet_for_images(1, 8, (8, 16)))
    for bad in (
        0.0,
        float("inf"),
        torch.zeros(2),
        torch.tensor([1.0, -1.0]),
        torch.tensor(math.inf),
    ):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            model(torch.zeros(2, 1, 8, 8), bad)
    with pytest.raises(ValueError, match="has no `unet`"):
        ConsistencyPrecond.from_teacher(FixedX0(torch.zeros(1, 1, 8, 8)))


def test_heun_step_of_a_fixed_x0_denoiser_lands_on_the_exact_solution():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    table = karras_sigmas(18)
    index = torch.tensor([0, 5, 11, 16])
    s_a, s_b = table[index], table[index + 1]
    x = x0 + s_a.view(-1, 1, 1, 1) * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    # dx/dsigma = (x - x0) / sigma: x(sigma) = x0 + (sigma / sigma_a) (x_a - x0)
    exact = x0 + (s_b / s_a).view(-1, 1, 1, 1) * (x - x0)
    torch.testing.assert_close(heun_step(FixedX0(x0), x, s_a, s_b), exact, rtol=1e-12, atol=1e-12)


def test_training_pairs_are_one_heun_step_apart_and_only_the_student_has_gradient():
    g = torch.Generator().manual_seed(1)
    x0 = torch.tanh(torch.randn(6, 1, 8, 8, generator=g))
    real = torch.tanh(torch.randn(6, 1, 8, 8, generator=g))
    torch.manual_seed(0)
    student = ConsistencyPrecond(unet_for_images(1, 8, (8, 16)))
    model = ConsistencyDistillation(teacher=FixedX0(x0), generator=student, ema_decay=None)
    assert model.target is None and model.target_network is model.generator  # mu = 0
    model.seed_noise(3)
    rng_state = model.pair_generator().get_state()
    pred, target, sigma, sigma_next = model.consistency_pair(real)
    assert pred.requires_grad and not target.requires_grad
    # the same draws by hand: i ~ U{0..N-2}, eps; then the exact ODE step of the fixed-x0 teacher
    model.pair_generator().set_state(rng_state)
    index = torch.randint(0, 17, (6,), generator=model.pair_generator())
    noise = torch.randn(real.shape, generator=model.pair_generator())
    table = karras_sigmas(18).float()
    torch.testing.assert_close(sigma, table[index])
    torch.testing.assert_close(sigma_next, table[index + 1])
    noisy = real + sigma.view(-1, 1, 1, 1) * noise
    stepped = x0 + (sigma_next / sigma).view(-1, 1, 1, 1) * (noisy - x0)
    with torch.no_grad():
        torch.testing.assert_close(target, student(stepped, sigma_next), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pred, student(noisy, sigma))


# ------------------------------------------------------------------------------------------
# The loss


def _reference(pred: Tensor, target: Tensor, distance: str, c: float) -> Tensor:
    """A loop over samples and elements, float64."""
    values = []
    for p, t in zip(pred.double().tolist(), target.double().tolist()):
        flat_p = torch.tensor(p).flatten().tolist()
        flat_t = torch.tensor(t).flatten().tolist()
        diffs = [a - b for a, b in zip(flat_p, flat_t)]
        if distance == "l2":
            values.append(sum(d * d for d in diffs) / len(diffs))
        elif distance == "l1":
            values.append(sum(abs(d) for d in diffs) / len(diffs))
        else:
            values.append(math.sqrt(sum(d * d for d in diffs) + c * c) - c)
    return torch.tensor(sum(values) / len(values), dtype=torch.float64)


@pytest.mark.parametrize("distance", ["l2", "l1", "pseudo_huber"])
def test_consistency_loss_matches_a_float64_loop(distance):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = 0.00054 * math.sqrt(32)
    assert pseudo_huber_c((2, 4, 4)) == pytest.approx(c, rel=1e-15)
    out = consistency_loss(pred, target, distance)
    loss = out.loss
    torch.testing.assert_close(loss, _reference(pred, target, distance, c))
    torch.testing.assert_close(out.mse, (pred - target).detach().square().mean())
    assert not out.mse.requires_grad
    loss.backward()
    assert target.grad is None and pred.grad is not None  # the target is a constant
    # a given c, B = 1, equal inputs
    torch.testing.assert_close(
        consistency_loss(pred[:1], target[:1], distance, huber_c=0.5).loss,
        _reference(pred[:1], target[:1], distance, 0.5),
    )
    assert consistency_loss(pred, pred.detach().clone(), distance).loss == 0
    # bf16 inputs are computed in float32
    low = consistency_loss(pred.bfloat16(), target.bfloat16(), distance).loss
    assert low.dtype == torch.float32
    assert consistency_distance(pred, target, distance).shape == (3,)


def test_pseudo_huber_is_l2_like_far_and_quadratic_near_with_bounded_gradient():
    c = 0.01
    far = torch.zeros(1, 1, 2, 2)
    far[0, 0, 0, 0] = 10.0
    near = far * 1e-4  # ||d|| = 1e-3 << c
    zero = torch.zeros_like(far)
    assert float(consistency_loss(far, zero, "pseudo_huber", c).loss) == pytest.approx(
        10 - c, rel=1e-6
    )
    assert float(consistency_loss(near, zero, "pseudo_huber", c).loss) == pytest.approx(
        1e-6 / (2 * c), rel=1e-2
    )
    pred = (100 * torch.randn(4, 1, 8, 8)).requires_grad_()
    consistency_loss(pred, torch.zeros_like(pred), "pseudo_huber").loss.backward()
    per_sample = pred.grad.flatten(1).norm(dim=1)
    assert bool((per_sample <= 0.25 + 1e-6).all())  # at most 1 / B per sample


def test_consistency_loss_refuses_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="must match"):
        consistency_loss(x, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="distance must be one of"):
        consistency_loss(x, x, "lpips")
    with pytest.raises(ValueError, match="huber_c"):
        consistency_loss(x, x, "pseudo_huber", huber_c=0.0)
    with pytest.raises(ValueError, match="floating-point"):
        consistency_loss(x.long(), x.long())
    with pytest.raises(ValueError, match="at least one"):
        consistency_loss(x[:0], x[:0])
    with pytest.raises(ValueError, match=r"\(B, \.\.\.\)"):
        consistency_loss(torch.zeros(4), torch.zeros(4))


# ------------------------------------------------------------------------------------------
# Construction


def test_student_starts_as_a_copy_of_the_teacher_unet_and_bad_arguments_raise():
    teacher = tiny_teacher()
    model = cd(teacher, target_decay=0.9)
    assert isinstance(model.generator, ConsistencyPrecond) and not hasattr(model, "fake_denoiser")
    dh.assert_same(dh.state(model.generator.unet), dh.state(teacher.unet))
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    for network in (model.generator, model.target, model.generator_ema):
        assert not any(p.data_ptr() in teacher_ptrs for p in network.parameters())
    assert not any(p.requires_grad for p in model.target.parameters())
    model.train()
    assert not model.target.training and not model.teacher.training and model.generator.training
    assert model.generator_sigma == 80.0 and model.sigma_data == 0.5
    torch.testing.assert_close(model.sigma_table, karras_sigmas(18).float())
    assert isinstance(model.configure_optimizers(), torch.optim.RAdam)
    assert any(k.startswith("target.") for k in model.state_dict())  # checkpointed
    assert not any(k.startswith("target.") for k in cd(teacher).state_dict())  # mu = 0

    with pytest.raises(ValueError, match="num_scales"):
        cd(teacher, num_scales=1)
    with pytest.raises(ValueError, match="target_decay"):
        cd(teacher, target_decay=1.5)
    with pytest.raises(ValueError, match="distance"):
        cd(teacher, distance="lpips")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        cd(teacher, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="must be a ConsistencyPrecond"):
        cd(teacher, generator=tiny_teacher())
    other = ConsistencyPrecond(unet_for_images(1, 8, (8, 16)), sigma_min=0.01)
    with pytest.raises(ValueError, match="make them equal"):
        cd(teacher, generator=other)
    with pytest.raises(ValueError, match="not both"):
        ConsistencyDistillation(teacher=teacher, teacher_path="somewhere")


def test_teacher_path_is_loaded_and_kept_as_a_hyperparameter(tmp_path):
    teacher = dh.export_tiny_teacher(tmp_path)
    # only the keys edm_config.json must hold: the image shape comes from the UNet's config
    config = json.loads((tmp_path / "edm_config.json").read_text())
    del config["in_channels"], config["sample_size"]
    (tmp_path / "edm_config.json").write_text(json.dumps(config))
    model = ConsistencyDistillation(teacher_path=str(tmp_path))
    dh.assert_same(dh.state(model.teacher), dh.state(teacher))
    dh.assert_same(dh.state(model.generator.unet), dh.state(teacher.unet))
    assert model.hparams.teacher_path == str(tmp_path)
    assert model.hparams.num_scales == 18


# ------------------------------------------------------------------------------------------
# Training behaviour


def test_target_and_sampling_ema_after_k_updates_equal_their_closed_forms():
    L.seed_everything(0)
    mu, beta, k = 0.6, 0.3, 3
    model = cd(target_decay=mu, ema_decay=beta)
    teacher_before = dh.state(model.teacher)
    recorder = dh.Recorder()
    dh.fit(model, RealImages(num=8 * k), callbacks=[recorder])
    assert len(recorder.after) == k and dh.changed(recorder.after[-1], recorder.start)
    assert int(model.generator_steps) == k and model.step_counters() == (0, k)
    dh.assert_same(dh.state(model.teacher), teacher_before)
    dh.assert_ema_of_the_recorded_weights(model.target, recorder, mu)
    dh.assert_ema_of_the_recorded_weights(model.generator_ema, recorder, beta)


def _counting(function, calls: list[int]):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return wrapper


def test_el_changes_only_the_generator_objective(monkeypatch):
    calls: dict[float, list[int]] = {0.0: [], 2.0: []}

    def counted(weight: float) -> ConsistencyDistillation:
        model = cd(el_weight=weight, target_decay=0.5)
        monkeypatch.setattr(model, "generate", _counting(model.generate, calls[weight]))
        return model

    (off, off_run), (on, on_run) = dh.fit_el_off_and_on(counted, 2.0, RealImages(num=16))
    assert len(off_run.metrics) == len(on_run.metrics) == 2  # two steps
    # the one-step forward f(sigma_max z) only happens with EL
    assert (len(calls[0.0]), len(calls[2.0])) == (0, 2)
    assert off.embedding_loss is None and isinstance(on.embedding_loss, EmbeddingLoss)
    first_off, first_on = off_run.metrics[0], on_run.metrics[0]
    # the same consistency pairs and student: the same base loss at the first step
    assert first_on["train/loss_base"] == first_off["train/loss_base"]
    assert first_off["train/loss_generator"] == first_off["train/loss_base"]
    expected = first_on["train/loss_base"] + 2.0 * first_on["train/loss_el"]
    assert first_on["train/loss_generator"] == pytest.approx(expected, rel=1e-6)
    assert "train/loss_el" not in first_off and first_on["train/loss_el"] > 0
    # the gradient norms at the student's outputs, and EL's share
    assert first_off["train/grad_norm_base"] > 0 and "train/grad_norm_ratio_el" not in first_off
    ratio = 2.0 * first_on["train/grad_norm_el"] / first_on["train/grad_norm_base"]
    assert first_on["train/grad_norm_ratio_el"] == pytest.approx(ratio, rel=1e-5)
    assert first_on["train/grad_norm_base"] == pytest.approx(first_off["train/grad_norm_base"])
    assert dh.changed(dh.state(on.generator), dh.state(off.generator))


def test_missing_real_images_raise():
    with pytest.raises(ValueError, match="noisy REAL images"):
        dh.fit(cd(), RealImages(labels_only=True), fast_dev_run=1)
    with pytest.raises(ValueError, match="need REAL images"):
        dh.fit(cd(el_weight=1.0), RealImages(labels_only=True), fast_dev_run=1)


# ------------------------------------------------------------------------------------------
# Trainer integration


def test_fast_dev_run_class_conditional_uses_the_real_labels(monkeypatch):
    L.seed_everything(0)
    model = ConsistencyDistillation(
        teacher=tiny_teacher(num_classes=4), num_classes=4, class_conditional=True, el_weight=0.1
    )
    seen = []
    original = model.consistency_pair
    monkeypatch.setattr(model, "consistency_pair", lambda r, y: seen.append(y) or original(r, y))
    dh.fit(model, RealImages(), fast_dev_run=True)
    assert int(model.generator_steps) == 1
    torch.testing.assert_close(seen[0], torch.arange(8) % 4)
    samples = model.sample(5, class_labels=torch.tensor([0, 1, 2, 3, 0]))
    assert samples.shape == (5, 1, 8, 8) and samples.abs().max() <= 1


def test_a_ddpm_teacher_gives_its_unet_and_clamps_its_own_levels():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    teacher = DiffusersEpsDenoiser(unet_for_images(1, 8, (8, 16)), DDPMScheduler()).eval()
    assert teacher.sigma_min > 0.002  # the Karras table reaches below the teacher's range
    model = ConsistencyDistillation(teacher=teacher, ema_decay=None)
    dh.assert_same(dh.state(model.generator.unet), dh.state(teacher.unet))
    assert model.sigma_data == model.generator.sigma_data == 0.5
    assert model.generator_sigma == model.generator.sigma_max == 80.0
    before = dh.state(model.generator)
    dh.fit(model, RealImages(), fast_dev_run=True)
    assert int(model.generator_steps) == 1 and dh.changed(dh.state(model.generator), before)
    assert torch.isfinite(model.sample(2)).all()


def test_bf16_mixed_steps_stay_finite():
    L.seed_everything(0)
    model = cd(el_weight=0.5, target_decay=0.9, grad_clip=1.0, distance="pseudo_huber")
    recorder = dh.Recorder()
    dh.fit(model, RealImages(num=24), precision="bf16-mixed", callbacks=[recorder])
    assert int(model.generator_steps) == 3
    for key, value in recorder.metrics[-1].items():
        assert math.isfinite(value), key
    dh.assert_float32_finite(model.generator, model.target, model.generator_ema)


def test_ddp_two_processes_cpu():
    L.seed_everything(0)
    model = cd(el_weight=0.5, target_decay=0.9)
    trainer = dh.fit_ddp(  # 2 steps on each rank
        model,
        RealImages(num=16, batch_size=4),
        DDP,
        networks=("generator", "target"),
        pair_noise=True,
    )
    assert int(model.generator_steps) == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss_base"]))


# ------------------------------------------------------------------------------------------
# Sampling and export


class Halve(nn.Module):
    """A deterministic 'consistency model' for the sampler: f(x, sigma) = x / (1 + sigma)."""

    sigma_min, sigma_max = 0.002, 80.0

    def forward(self, x: Tensor, sigma: float) -> Tensor:
        return x / (1 + sigma)


def test_consistency_sampler_denoises_and_renoises_in_draw_order():
    levels = [80.0, 2.0, 0.5]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 4, 4, generator=g)
    out = consistency_sampler(Halve(), z, levels, generator=g, clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g) * 80.0
    for i, sigma in enumerate(levels):
        denoised = x / (1 + sigma)
        if i + 1 < len(levels):
            x = denoised + math.sqrt(levels[i + 1] ** 2 - 0.002**2) * torch.randn(
                2, 1, 4, 4, generator=g
            )
    torch.testing.assert_close(out, denoised)
    clipped = consistency_sampler(Halve(), 100 * z, [1.0])
    torch.testing.assert_close(clipped, (100 * z / 2).clamp(-1, 1))
    for bad in ([2.0, 80.0], [100.0], [0.001]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            consistency_sampler(Halve(), z, bad)


def test_export_round_trip_reproduces_the_module_samples(tmp_path, monkeypatch):
    from diffusers import ConsistencyModelPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    L.seed_everything(0)
    model = cd(ema_decay=0.5, num_scales=10)
    dh.fit(model, RealImages(num=16))
    loud(model.generator_ema, 5.0)  # samples leave [-1, 1]: the clipping must match too
    assert dh.changed(dh.state(model.generator_ema), dh.state(model.generator))
    raw = model.generate(torch.randn(4, 1, 8, 8), None, model.generator_ema)
    assert raw.abs().max() > 1.2
    model.save_pretrained(tmp_path / "export")  # use_ema=True
    model.save_pretrained(tmp_path / "trained", use_ema=False)
    config = json.loads((tmp_path / "export/scheduler/scheduler_config.json").read_text())
    assert config["_class_name"] == "CMStochasticIterativeScheduler"
    assert (config["num_train_timesteps"], config["sigma_min"], config["sigma_max"]) == (
        10,
        0.002,
        80.0,
    )
    assert config["clip_denoised"] is True

    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "export", low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    for seed in (0, 1):
        images = pipe(
            batch_size=4,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images
        mine = model.sample(4, generator=torch.Generator().manual_seed(seed))
        assert mine.abs().max() == 1  # clipped
        torch.testing.assert_close(images * 2 - 1, mine, rtol=0, atol=1e-5)
    # two steps: the scheduler's levels (float64, from its timesteps 250 ln sigma)
    images = pipe(
        batch_size=3,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).images
    levels = (pipe.scheduler.timesteps.double() / 250).exp()
    mine = model.sample_multistep(3, levels, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(images * 2 - 1, mine, rtol=0, atol=1e-5)
    # reloaded as a ConsistencyPrecond: the EMA weights (use_ema=False: the trained ones)
    dh.assert_same(
        dh.state(ConsistencyPrecond.from_pretrained(tmp_path / "export")),
        dh.state(model.generator_ema),
    )
    dh.assert_same(
        dh.state(ConsistencyPrecond.from_pretrained(tmp_path / "trained")),
        dh.state(model.generator),
    )


def test_class_conditional_export_with_given_labels(tmp_path):
    from diffusers import ConsistencyModelPipeline

    model = ConsistencyDistillation(
        teacher=tiny_teacher(num_classes=4), num_classes=4, class_conditional=True
    )
    labels = torch.tensor([3, 0, 2])
    pipe = ConsistencyModelPipeline.from_pretrained(
        model.save_pretrained(tmp_path / "export"), low_cpu_mem_usage=False
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=3,
        class_labels=labels,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    mine = model.sample(3, class_labels=labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images * 2 - 1, mine, rtol=0, atol=1e-5)
    other = model.sample(
        3, class_labels=torch.tensor([1, 1, 1]), generator=torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(other, mine)  # the labels matter
    single = model.sample_multistep(
        3, [80.0], class_labels=labels, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(single, mine)


# ------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("config", DIGITS_CONFIGS, ids=lambda p: p.name)
def test_digits_configs_instantiate_with_a_tiny_teacher(config, tmp_path):
    model = dh.instantiate_digits_config(config, tmp_path, ConsistencyDistillation).model
    assert model.num_scales == 18 and model.sigma_table.numel() == 18
    assert isinstance(model.configure_optimizers(), torch.optim.RAdam)


def test_digits_el_config_fits_through_the_cli_and_reloads(tmp_path):
    model = dh.fit_config_and_reload(
        DIGITS_CONFIGS[1],
        tmp_path,
        ConsistencyDistillation,
        "--data.init_args.batch_size=32",
        "--trainer.max_steps=2",
    )
    assert int(model.generator_steps) == 2 and model.el_weight > 0
    assert model.distance == "pseudo_huber"


def test_the_two_digits_configs_differ_only_in_el_weight():
    dh.assert_configs_differ_only_in_el_weight([p.name for p in DIGITS_CONFIGS])


def test_cifar10_config_holds_the_paper_settings():
    config = yaml.safe_load(CIFAR_CONFIG.read_text())
    args = config["model"]["init_args"]
    assert config["model"]["class_path"] == "lightning_losses.modules.ConsistencyDistillation"
    assert (args["num_scales"], args["sigma_min"], args["sigma_max"], args["rho"]) == (
        18,
        0.002,
        80.0,
        7.0,
    )
    assert args["generator_optimizer"]["class_path"] == "torch.optim.RAdam"
    assert args["generator_optimizer"]["init_args"]["lr"] == 4e-4
    (el,) = args["supplementary_losses"]  # EL composed, not the el_weight shorthand
    assert el["class_path"].endswith("EmbeddingSupplement") and el["init_args"]["weight"] > 0
    assert "el_weight" not in args and args["teacher_path"] == "data/ddpm-cifar10-32"
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert 128 <= config["data"]["init_args"]["batch_size"] <= 512
    assert config["data"]["init_args"]["normalize"] == "symmetric"
    callbacks = {c["class_path"]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    assert callbacks["lightning_losses.callbacks.FIDCallback"] == {
        "feature": 2048,
        "num_samples": 10000,
        "every_n_steps": 5000,
        "real": "train",
    }
    grid = callbacks["lightning_losses.callbacks.SampleGridCallback"]
    assert (grid["num_samples"], grid["every_n_steps"]) == (64, 1000)
