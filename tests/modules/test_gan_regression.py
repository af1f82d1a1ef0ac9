"""DMD2's GAN head and DMD1's regression loss as supplementary losses (issue 11 items 2, 3):
gradient routing, the optimizers, fast_dev_run, bf16, DDP and the clear errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor

from lightning_losses.diffusion import (
    EDMPrecond,
    make_teacher_pairs,
    save_teacher_pairs,
)
from lightning_losses.modules import (
    ConsistencyDistillation,
    DiffInstructDistillation,
    DMDDistillation,
    GANSupplement,
    RegressionSupplement,
)
from tests.fakes import DDP_FIND_UNUSED, assert_spawn_picklable, quiet_trainer
from tests.fakes import tiny_edm_teacher as tiny_teacher
from tests.modules import distillation_helpers as dh


def real_batch(n: int = 4) -> Tensor:
    return torch.tanh(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5)))


def grads(module: torch.nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def gan_dmd(**kwargs) -> DMDDistillation:
    return DMDDistillation(
        teacher=tiny_teacher(),
        fake_updates_per_generator=1,
        supplementary_losses=[GANSupplement(weight=0.1)],
        **kwargs,
    )


# ------------------------------------------------------------------------------------------
# GAN head


def test_gan_gradients_reach_each_network_only_through_its_own_loss():
    model = gan_dmd()
    gan = model.supplementary("gan")
    assert gan.head.in_channels == 16 and gan.head.spatial_size == 4  # the mid block
    model.seed_noise(0)
    x = model.generate(torch.randn(4, 1, 8, 8))
    real = real_batch()
    # generator loss: the generator only (the head and the fake denoiser are frozen for it)
    gan(x, real, None, None, module=model).backward()
    assert all(g is not None for g in grads(model.generator))
    assert all(g is None for g in grads(gan.head) + grads(model.fake_denoiser))
    assert all(p.requires_grad for p in gan.head.parameters())  # restored after the term
    model.generator.zero_grad(set_to_none=True)
    # discriminator loss: the head and the fake denoiser's trunk, never the generator
    loss, logs = gan.discriminator_loss(x, real, None, None, model)
    loss.backward()
    assert all(g is None for g in grads(model.generator))
    assert all(g is not None for g in grads(gan.head))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(model.fake_denoiser))
    assert float(logs["train/gan_d_loss"]) * 1e-2 == pytest.approx(float(loss), rel=1e-6)
    # the head trains with the fake denoiser's optimizer
    _, fake_optimizer = model.configure_optimizers()
    trained = {id(p) for group in fake_optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in gan.head.parameters()} <= trained


def test_gan_changes_only_the_generator_objective_and_the_fake_denoisers_loss():
    runs = {}
    for with_gan in (False, True):
        L.seed_everything(0)
        extra = [GANSupplement(weight=0.1)] if with_gan else []
        model = DMDDistillation(
            teacher=tiny_teacher(), fake_updates_per_generator=1, supplementary_losses=extra
        )
        model.seed_noise(0)
        runs[with_gan] = model.train_step((real_batch(), torch.zeros(4, dtype=torch.long)))
    off, on = runs[False], runs[True]
    # its own noise generator: the base loss and the fake loss see the same draws
    assert float(on["train/loss_base"]) == float(off["train/loss_base"])
    assert float(on["train/loss_fake"]) == float(off["train/loss_fake"])
    expected = float(on["train/loss_base"]) + 0.1 * float(on["train/loss_gan"])
    assert float(on["train/loss_generator"]) == pytest.approx(expected, rel=1e-6)
    for key in ("train/gan_d_loss", "train/gan_d_real_accuracy", "train/grad_norm_gan"):
        assert math.isfinite(float(on[key])), key


@pytest.mark.parametrize("cls", [DMDDistillation, DiffInstructDistillation])
def test_gan_fast_dev_run_and_bf16(cls):
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        model = cls(
            teacher=tiny_teacher(),
            fake_updates_per_generator=1,
            supplementary_losses=[GANSupplement(weight=0.1)],
        )
        head = [p.detach().clone() for p in model.supplementary("gan").head.parameters()]
        trainer = quiet_trainer(fast_dev_run=2, precision=precision)
        trainer.fit(model, dh.TinyImages(num=16, batch_size=4))
        after = list(model.supplementary("gan").head.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(head, after))  # the head trained
        for name in ("train/loss_gan", "train/gan_d_loss", "train/loss_fake"):
            assert math.isfinite(float(trainer.callback_metrics[name])), (precision, name)
        assert all(torch.isfinite(p).all() for p in model.generator.parameters())


def test_gan_class_conditional_and_consistency_errors():
    L.seed_everything(0)
    model = DMDDistillation(
        teacher=tiny_teacher(num_classes=4),
        class_conditional=True,
        fake_updates_per_generator=1,
        supplementary_losses=[GANSupplement(weight=0.1)],
    )
    quiet_trainer(fast_dev_run=1).fit(model, dh.TinyImages(num=16, batch_size=4))
    with pytest.raises(ValueError, match="fake denoiser.*not with\\s+ConsistencyDistillation"):
        ConsistencyDistillation(teacher=tiny_teacher(), supplementary_losses=[GANSupplement()])
    with pytest.raises(ValueError, match="names no sub-module"):
        DMDDistillation(
            teacher=tiny_teacher(), supplementary_losses=[GANSupplement(feature_path="unet.nope")]
        )


@pytest.mark.ddp
def test_gan_ddp_two_processes():
    L.seed_everything(0)
    model = gan_dmd()
    data = dh.TinyImages(num=16, batch_size=4)  # 2 steps on each rank
    assert_spawn_picklable(model, data)
    trainer = quiet_trainer(devices=2, strategy=DDP_FIND_UNUSED, max_epochs=1)
    trainer.fit(model, data)
    assert int(model.generator_steps) == 2
    assert math.isfinite(float(trainer.callback_metrics["train/gan_d_loss"]))


# ------------------------------------------------------------------------------------------
# Regression loss


def pairs_file(tmp_path, teacher: EDMPrecond, count: int = 8):
    pairs = make_teacher_pairs(teacher, count, seed=0, num_steps=3)
    return save_teacher_pairs(pairs, tmp_path / "pairs.safetensors"), pairs


def regression_dmd(
    tmp_path, weight: float, weight_mode: str = "fixed", **kwargs
) -> DMDDistillation:
    """DMD (1:1 updates) with the regression term on 8 pairs of its tiny teacher, in batches of
    4; seeded after the pairs are made."""
    teacher = tiny_teacher()
    path, _ = pairs_file(tmp_path, teacher)
    L.seed_everything(0)
    return DMDDistillation(
        teacher=teacher,
        fake_updates_per_generator=1,
        supplementary_losses=[RegressionSupplement(path, weight, weight_mode, batch_size=4)],
        **kwargs,
    )


def test_regression_term_on_teacher_pairs_measured_at_its_own_output(tmp_path):
    model = regression_dmd(tmp_path, 0.25, log_grad_norm_every=1)
    model.seed_noise(0)
    logs = model.train_step((real_batch(), torch.zeros(4, dtype=torch.long)))
    # the generator starts as the teacher's copy: G(z) is one teacher step, not its ODE sample
    assert float(logs["train/loss_regression"]) > 0
    assert float(logs["train/grad_norm_regression"]) > 0  # at G(z_n), not at the step's x
    expected = float(logs["train/loss_base"]) + 0.25 * float(logs["train/loss_regression"])
    assert float(logs["train/loss_generator"]) == pytest.approx(expected, rel=1e-6)
    # the term's own value: the regression loss of G(z_n) against x_n
    term = model.supplementary("regression")
    loss, generated = term(None, None, module=model)
    assert generated.shape == (4, 1, 8, 8) and loss.requires_grad
    quiet_trainer(fast_dev_run=1, precision="bf16-mixed").fit(
        model, dh.TinyImages(num=16, batch_size=4)
    )


def test_regression_pairs_must_fit_the_module(tmp_path):
    path, _ = pairs_file(tmp_path, tiny_teacher(num_classes=4))
    with pytest.raises(ValueError, match="class-conditional teacher pairs"):
        DMDDistillation(teacher=tiny_teacher(), supplementary_losses=[RegressionSupplement(path)])


def test_gan_config_fits_through_the_cli_and_reloads_without_arguments(tmp_path):
    import yaml

    config = dh.CONFIGS / "digits_dmd_gan.yaml"
    plain = yaml.safe_load((dh.CONFIGS / "digits_dmd.yaml").read_text())
    gan = yaml.safe_load(config.read_text())
    (term,) = gan["model"]["init_args"].pop("supplementary_losses")
    assert term["class_path"].endswith("GANSupplement")
    assert plain["model"] == gan["model"] and plain["data"] == gan["data"]
    model = dh.fit_config_and_reload(  # the saved weights, the head's among them, come back
        config,
        tmp_path,
        DMDDistillation,
        "--model.init_args.fake_updates_per_generator=1",
        "--data.init_args.batch_size=16",
        "--trainer.max_steps=4",
    )
    assert isinstance(model.supplementary("gan"), GANSupplement)
    assert any(k.startswith("supplementary_losses.0.head.") for k in model.state_dict())


class SameGenerator(L.Callback):
    """Under DDP: one automatic weight on every rank, so the generators stay identical."""

    def on_train_end(self, trainer, pl_module) -> None:
        total = torch.stack([p.detach().double().sum() for p in pl_module.generator.parameters()])
        gathered = trainer.strategy.all_gather(total.sum())
        assert torch.equal(gathered[0], gathered[1]), gathered


@pytest.mark.ddp
def test_regression_with_an_automatic_weight_under_ddp(tmp_path):
    model = regression_dmd(tmp_path, 0.5, "auto")
    assert_spawn_picklable(model)
    trainer = quiet_trainer(
        devices=2,
        strategy=DDP_FIND_UNUSED,
        max_epochs=1,
        callbacks=[SameGenerator()],
    )
    trainer.fit(model, dh.TinyImages(num=16, batch_size=4))
    assert int(model.generator_steps) == 2
    ratio = float(trainer.callback_metrics["train/grad_norm_ratio_regression"])
    assert math.isnan(ratio) or ratio == pytest.approx(0.5, rel=1e-4)  # NaN: a zero DMD step
