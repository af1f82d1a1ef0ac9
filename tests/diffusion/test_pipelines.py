"""OneStepPipeline export / reload, teachers from diffusers folders, the CIFAR-10 DMD+EL config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from lightning_losses.datamodules import CIFAR10DataModule
from lightning_losses.diffusion import (
    Denoiser,
    DiffusersEpsDenoiser,
    EDMPrecond,
    unet_for_images,
)
from lightning_losses.modules import DMDDistillation
from lightning_losses.modules.distillation import load_teacher
from lightning_losses.modules.teacher import DiffusionTeacher
from tests.fakes import QUIET
from tests.modules.distillation_helpers import TinyImages

diffusers = pytest.importorskip("diffusers")
from lightning_losses.diffusion.pipelines import (  # noqa: E402 (needs diffusers)
    OneStepPipeline,
    one_step_pipeline_from_denoiser,
)

REPO = Path(__file__).resolve().parents[2]
CIFAR_CONFIG = REPO / "configs/distillation/cifar10_dmd_el.yaml"


# ------------------------------------------------------------------------------------------
# Helpers


def tiny_unet(num_classes: int | None = None, channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return unet_for_images(channels, 8, (8, 16), num_classes=num_classes)


def tiny_edm(num_classes: int | None = None, channels: int = 1) -> EDMPrecond:
    return EDMPrecond(tiny_unet(num_classes, channels), sigma_data=0.5).eval()


def write_ddpm_pipeline(root: Path, seed: int = 0) -> nn.Module:
    """A tiny random DDPM pipeline folder (model_index.json, unet/, scheduler/); its UNet."""
    unet = tiny_unet(seed=seed)
    assert unet.config.time_embedding_type == "positional"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(root)
    return unet


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturb(network: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter by seeded noise (stands in for training, in no time)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def trained_apart(model: DMDDistillation) -> DMDDistillation:
    """Generator, EMA and teacher all different: generator perturbed, then an EMA half step."""
    perturb(model.generator, seed=1)
    model.update_ema(0.5)
    perturb(model.generator, seed=2)
    return model


def pt(pipeline: OneStepPipeline, n: int, seed: int, **kwargs) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipeline(batch_size=n, generator=generator, output_type="pt", **kwargs).images


def reload(model: DMDDistillation, root: Path, use_ema: bool = True) -> OneStepPipeline:
    written = model.save_pretrained(root, use_ema=use_ema)
    assert written == root and (root / "model_index.json").is_file()
    return OneStepPipeline.from_pretrained(root)


# ------------------------------------------------------------------------------------------
# Round trips: module.sample == OneStepPipeline.from_pretrained(save_pretrained(...))


def test_edm_unconditional_round_trip_is_bit_exact(tmp_path):
    model = trained_apart(DMDDistillation(teacher=tiny_edm(), ema_decay=0.9))
    pipeline = reload(model, tmp_path / "export")
    assert isinstance(pipeline, OneStepPipeline)
    config = pipeline.config
    assert config.parameterization == "edm" and config.generator_sigma == 80.0
    assert (config.sigma_data, config.sigma_min, config.sigma_max) == (0.5, 0.002, 80.0)
    assert config.num_classes is None and pipeline.scheduler is None
    assert not (tmp_path / "export" / "scheduler").exists()
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    for seed in (0, 7):
        expected = model.sample(5, generator=torch.Generator().manual_seed(seed))
        got = pt(pipeline, 5, seed)
        assert got.dtype == torch.float32 and got.shape == (5, 1, 8, 8)
        assert torch.equal(got, expected)
    # the reference by hand: x = D_ema(sigma_g z; sigma_g), z the generator's first draw
    z = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = model.generator_ema(80.0 * z, 80.0)
    assert torch.equal(pt(pipeline, 5, 0), by_hand)
    assert not torch.equal(pt(pipeline, 5, 0), pt(pipeline, 5, 1))


def test_edm_class_conditional_round_trip_given_and_drawn_labels(tmp_path):
    teacher = tiny_edm(num_classes=4)
    model = trained_apart(DMDDistillation(teacher=teacher, class_conditional=True, ema_decay=0.9))
    model.generator_sigma = 20.0  # a non-default sigma_g must travel with the folder
    pipeline = reload(model, tmp_path / "export")
    assert pipeline.config.num_classes == 4 and pipeline.config.generator_sigma == 20.0

    labels = torch.tensor([3, 0, 2, 1, 3])
    expected = model.sample(5, class_labels=labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pt(pipeline, 5, 0, class_labels=labels), expected)
    assert torch.equal(pt(pipeline, 5, 0, class_labels=labels.tolist()), expected)

    # drawn labels: z first, then the labels, from the same generator
    drawn = model.sample(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pt(pipeline, 6, 3), drawn)
    g = torch.Generator().manual_seed(3)
    z = torch.randn((6, 1, 8, 8), generator=g)
    drawn_labels = torch.randint(0, 4, (6,), generator=g)
    with torch.no_grad():
        by_hand = model.generator_ema(20.0 * z, 20.0, drawn_labels)
    assert torch.equal(drawn, by_hand)
    # the labels matter (the test would not notice them otherwise)
    other = (drawn_labels + 1) % 4
    assert not torch.equal(pt(pipeline, 6, 3, class_labels=other), drawn)


def test_use_ema_picks_the_saved_weights(tmp_path):
    model = trained_apart(DMDDistillation(teacher=tiny_edm(), ema_decay=0.9))
    ema_state, trained_state = state(model.generator_ema.unet), state(model.generator.unet)
    assert not same_state(ema_state, trained_state)
    with_ema = reload(model, tmp_path / "ema", use_ema=True)
    without = reload(model, tmp_path / "trained", use_ema=False)
    assert same_state(state(with_ema.unet), ema_state)
    assert same_state(state(without.unet), trained_state)
    expected = model.sample(4, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert torch.equal(pt(without, 4, 0), expected)
    assert not torch.equal(pt(with_ema, 4, 0), expected)

    # without an EMA both fall back to the trained generator, as sample() does
    plain = DMDDistillation(teacher=tiny_edm(), ema_decay=None)
    perturb(plain.generator, seed=5)
    fallback = reload(plain, tmp_path / "plain", use_ema=True)
    assert same_state(state(fallback.unet), state(plain.generator.unet))


def test_to_pipeline_copies_unless_asked_to_share():
    model = trained_apart(DMDDistillation(teacher=tiny_edm(), ema_decay=0.9))
    copied = model.to_pipeline()
    shared = model.to_pipeline(copy_weights=False)
    assert shared.unet is model.generator_ema.unet
    assert copied.unet is not model.generator_ema.unet
    assert same_state(state(copied.unet), state(model.generator_ema.unet))
    expected = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pt(copied, 3, 0), expected) and torch.equal(pt(shared, 3, 0), expected)
    perturb(copied.unet, seed=9)  # a copy: the module's EMA generator is untouched
    assert torch.equal(model.sample(3, generator=torch.Generator().manual_seed(0)), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eps_denoiser_round_trip_keeps_scheduler_and_prediction_type(tmp_path, prediction_type):
    # the override differs from the scheduler's own "epsilon" for v_prediction: it must be stored
    denoiser = DiffusersEpsDenoiser(
        tiny_unet(), diffusers.DDPMScheduler(beta_end=0.03), prediction_type=prediction_type
    )
    sigma = 12.5
    one_step_pipeline_from_denoiser(denoiser, sigma).save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    pipeline = OneStepPipeline.from_pretrained(tmp_path)
    assert pipeline.config.parameterization == "eps"
    assert pipeline.config.prediction_type == prediction_type
    assert pipeline.config.sigma_data is None
    assert isinstance(pipeline.scheduler, diffusers.DDPMScheduler)
    assert pipeline.scheduler.config.beta_end == 0.03
    assert torch.equal(pipeline.denoiser.sigma_table, denoiser.sigma_table)
    z = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = denoiser(sigma * z, sigma)
    assert torch.equal(pt(pipeline, 3, 4), expected)


def test_ddpm_teacher_folder_trains_with_dmd_exports_and_reloads(tmp_path):
    """A diffusers DDPM pipeline folder as teacher, end to end: train, export, reload, sample."""
    teacher_unet = write_ddpm_pipeline(tmp_path / "ddpm")
    L.seed_everything(0)
    from lightning_losses.losses import EmbeddingLoss
    from lightning_losses.nets.embedders import RandomEmbedderBank

    # a random DDPM teacher generates far outside [-1, 1] at sigma_g = 157: EL's range check off
    el = EmbeddingLoss(RandomEmbedderBank(1, seed=0), value_range=None)
    model = DMDDistillation(
        teacher_path=str(tmp_path / "ddpm"),
        el_weight=0.01,
        embedding_loss=el,
        fake_updates_per_generator=1,
        ema_decay=0.5,
    )
    assert isinstance(model.teacher, DiffusersEpsDenoiser)
    assert same_state(state(model.teacher.unet), state(teacher_unet))
    assert model.generator_sigma == pytest.approx(157.4, abs=0.05)  # the table's top: t = 999
    trainer = L.Trainer(**QUIET, max_steps=6, max_epochs=10)  # 3 steps, 2 optimizer steps each
    trainer.fit(model, TinyImages(num=16))
    assert (int(model.fake_steps), int(model.generator_steps)) == (3, 3)
    assert not same_state(state(model.generator.unet), state(teacher_unet))
    assert not same_state(state(model.generator_ema.unet), state(model.generator.unet))

    model.eval()
    pipeline = reload(model, tmp_path / "export")
    assert pipeline.config.parameterization == "eps"
    assert pipeline.config.generator_sigma == model.generator_sigma
    assert pipeline.config.prediction_type == "epsilon"
    assert pipeline.scheduler.config == model.generator_ema.scheduler.config
    for seed in (0, 1):
        expected = model.sample(4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pt(pipeline, 4, seed), expected)
    trained = reload(model, tmp_path / "trained", use_ema=False)
    expected = model.sample(4, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert torch.equal(pt(trained, 4, 0), expected)


# ------------------------------------------------------------------------------------------
# Output types and bad input


def test_output_types_and_clamping(tmp_path):
    # a random DDPM UNet at sigma_g = 157: D = x - sigma * eps_hat lands far outside [-1, 1]
    denoiser = DiffusersEpsDenoiser(tiny_unet(channels=3), diffusers.DDPMScheduler())
    pipeline = one_step_pipeline_from_denoiser(denoiser, denoiser.sigma_max)
    raw = pt(pipeline, 3, 0)
    assert raw.shape == (3, 3, 8, 8) and not raw.requires_grad
    assert raw.abs().max() > 1  # "pt" is not clamped
    expected = (raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    images = pipeline(3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert isinstance(images, np.ndarray) and images.dtype == np.float32
    assert images.shape == (3, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images, expected)
    pil = pipeline(3, generator=torch.Generator().manual_seed(0)).images  # "pil" by default
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[1]), (expected[1] * 255).round().astype("uint8"))
    (as_tuple,) = pipeline(3, generator=torch.Generator().manual_seed(0), output_type="pt",
                           return_dict=False)  # fmt: skip
    assert torch.equal(as_tuple, raw)
    gray = one_step_pipeline_from_denoiser(tiny_edm(), 80.0)(2, output_type="pil").images
    assert gray[0].mode == "L"


class NotAUNet(nn.Module):
    """Has a UNet2DModel-like config and call signature, but is not a UNet2DModel."""

    def __init__(self) -> None:
        super().__init__()
        self.config = dict(in_channels=1, out_channels=1, sample_size=8)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, sample, timestep, class_labels=None, return_dict=False):
        return (self.scale * sample,)


class LinearDenoiser(Denoiser):
    def __init__(self) -> None:
        super().__init__(sigma_min=0.002, sigma_max=80.0, in_channels=1, sample_size=8)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, class_labels=None):
        return self.scale * x


def test_bad_generators_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="EDMPrecond or a DiffusersEpsDenoiser"):
        one_step_pipeline_from_denoiser(nn.Linear(2, 2), 80.0)
    with pytest.raises(ValueError, match="UNet2DModel inside the EDMPrecond.*NotAUNet"):
        one_step_pipeline_from_denoiser(EDMPrecond(NotAUNet()), 80.0)
    model = DMDDistillation(teacher=tiny_edm(), generator=LinearDenoiser(), ema_decay=None)
    with pytest.raises(ValueError, match="EDMPrecond or a DiffusersEpsDenoiser.*LinearDenoiser"):
        model.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export").exists()  # nothing written on failure


def test_bad_pipeline_arguments_raise():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="UNet2DModel"):
        OneStepPipeline(NotAUNet())
    with pytest.raises(ValueError, match="parameterization must be"):
        OneStepPipeline(unet, parameterization="ve")
    with pytest.raises(ValueError, match="takes no scheduler"):
        OneStepPipeline(unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="needs the DDPM scheduler"):
        OneStepPipeline(unet, parameterization="eps", sigma_data=None, sigma_min=None)
    with pytest.raises(ValueError, match="for parameterization='edm'"):
        OneStepPipeline(unet, scheduler=diffusers.DDPMScheduler(), parameterization="eps")
    with pytest.raises(ValueError, match="generator_sigma"):
        OneStepPipeline(unet, generator_sigma=0.0)
    with pytest.raises(ValueError, match="num_classes=3 but the UNet has num_class_embeds=None"):
        OneStepPipeline(unet, num_classes=3)

    pipeline = OneStepPipeline(unet)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline(0)
    with pytest.raises(ValueError, match="unconditional"):
        pipeline(2, class_labels=[0, 1])
    with pytest.raises(ValueError, match="output_type"):
        pipeline(2, output_type="latent")
    with pytest.raises(ValueError, match="single torch.Generator"):
        pipeline(2, generator=[torch.Generator(), torch.Generator()])
    conditional = OneStepPipeline(tiny_unet(num_classes=4), num_classes=4)
    with pytest.raises(ValueError, match=r"class_labels must be 3 integers"):
        conditional(3, class_labels=[0, 1])
    with pytest.raises(ValueError, match=r"class_labels must be 3 integers"):
        conditional(3, class_labels=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        conditional(3, class_labels=[0, 1, 4])


# ------------------------------------------------------------------------------------------
# load_teacher: the three layouts


def test_load_teacher_reads_the_three_layouts(tmp_path):
    # 1. DiffusionTeacher.save_pretrained: edm_config.json + unet/
    torch.manual_seed(0)
    edm = DiffusionTeacher(in_channels=1, sample_size=8, channels=(8, 16))
    edm.save_pretrained(tmp_path / "edm")
    loaded = load_teacher(tmp_path / "edm")
    assert isinstance(loaded, EDMPrecond) and not loaded.training
    assert same_state(state(loaded.unet), state(edm.ema.unet))

    # 2. a diffusers DDPM pipeline folder
    unet = write_ddpm_pipeline(tmp_path / "pipeline", seed=1)
    loaded = load_teacher(str(tmp_path / "pipeline"))
    assert isinstance(loaded, DiffusersEpsDenoiser) and not loaded.training
    assert same_state(state(loaded.unet), state(unet))
    assert loaded.sigma_max == pytest.approx(157.4, abs=0.05)

    # 3. a flat unet + scheduler pair
    flat = tmp_path / "flat"
    unet = tiny_unet(seed=2)
    unet.save_pretrained(flat)
    diffusers.DDIMScheduler(beta_end=0.03).save_pretrained(flat)
    loaded = load_teacher(flat)
    assert isinstance(loaded, DiffusersEpsDenoiser)
    assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)
    assert same_state(state(loaded.unet), state(unet))
    reference = DiffusersEpsDenoiser(unet, diffusers.DDIMScheduler(beta_end=0.03))
    assert torch.equal(loaded.sigma_table, reference.sigma_table)


def test_load_teacher_missing_or_unreadable_folder_messages(tmp_path):
    layouts = r"edm_config\.json.*model_index\.json.*scheduler_config\.json.*digits_teacher\.yaml"
    with pytest.raises(FileNotFoundError, match="no denoiser folder at .*" + layouts):
        load_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no denoiser .*" + layouts):
        load_teacher(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="digits_teacher.yaml"):
        DMDDistillation(teacher_path=str(tmp_path / "missing"))
    # a distilled generator is not a teacher
    one_step_pipeline_from_denoiser(tiny_edm(), 80.0).save_pretrained(tmp_path / "one_step")
    with pytest.raises(ValueError, match=r"distilled generator \(OneStepPipeline\)"):
        load_teacher(tmp_path / "one_step")


def test_save_pretrained_refuses_a_folder_holding_another_model_and_load_checks_the_class_first(
    tmp_path,
):
    """Issue 14.2: a generator saved over a teacher folder no longer replaces its unet/."""
    torch.manual_seed(0)
    teacher = DiffusionTeacher(in_channels=1, sample_size=8, channels=(8, 16))
    folder = teacher.save_pretrained(tmp_path / "teacher")
    weights = {p.name: p.read_bytes() for p in (folder / "unet").iterdir()}
    model = DMDDistillation(teacher=load_teacher(folder))
    with pytest.raises(FileExistsError, match="already holds a saved model.*overwrite=True"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in (folder / "unet").iterdir()} == weights
    with pytest.raises(FileExistsError, match="overwrite=True"):
        teacher.save_pretrained(folder)  # the teacher too: re-saving must be asked for
    teacher.save_pretrained(folder, overwrite=True)
    # asked for: the folder now holds the generator AND the old edm_config.json; the pipeline
    # class is read first, so it is not taken for a teacher
    model.save_pretrained(folder, overwrite=True)
    assert (folder / "edm_config.json").is_file()
    with pytest.raises(ValueError, match="distilled generator"):
        load_teacher(folder)
    # an empty folder, or a folder with other files, is fine
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("x")
    model.save_pretrained(tmp_path / "notes")


# ------------------------------------------------------------------------------------------
# The CIFAR-10 DMD+EL config


def test_cifar_config_holds_the_documented_recipe():
    config = yaml.safe_load(CIFAR_CONFIG.read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["precision"] == "bf16-mixed"
    assert model["class_path"] == "lightning_losses.modules.DMDDistillation"
    args = model["init_args"]
    assert args["teacher_path"] == "data/ddpm-cifar10-32"
    assert args["fake_updates_per_generator"] == 5
    assert args["grad_clip"] == args["fake_grad_clip"] == 10.0
    (el,) = args["supplementary_losses"]  # EL composed, not the el_weight shorthand
    assert args["ema_decay"] == 0.999 and el["init_args"]["weight"] > 0
    for name in ("generator_optimizer", "fake_optimizer"):
        assert args[name]["class_path"] == "torch.optim.AdamW"
        assert 2e-6 <= args[name]["init_args"]["lr"] <= 1e-5
    assert 64 <= data["init_args"]["batch_size"] <= 128
    assert data["class_path"] == "lightning_losses.datamodules.CIFAR10DataModule"
    assert data["init_args"]["normalize"] == "symmetric"
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in
                 trainer["callbacks"]}  # fmt: skip
    assert callbacks["FIDCallback"] == {
        "feature": 2048,
        "num_samples": 10000,
        "every_n_steps": 5000,
        "real": "train",
    }
    assert callbacks["SampleGridCallback"] == {"num_samples": 64, "every_n_steps": 1000}
    assert "ModelCheckpoint" in callbacks
    assert "snapshot_download" in CIFAR_CONFIG.read_text()  # how to fetch the teacher


CIFAR_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.logger.init_args.save_dir={tmp}",
    "--trainer.default_root_dir={tmp}",
    "--data.init_args.root={tmp}/data",
]


def test_cifar_config_parses_with_the_cli(tmp_path, monkeypatch):
    """The config file as it is: class paths, argument names and types (nothing is built)."""
    from lightning_losses.cli import LossesCLI, main

    monkeypatch.setattr(LossesCLI, "instantiate_classes", lambda self: None)
    args = ["--config", str(CIFAR_CONFIG)] + [a.format(tmp=tmp_path) for a in CIFAR_ARGS]
    config = main(args=args, run=False).config
    assert config.model.class_path == "lightning_losses.modules.DMDDistillation"
    assert config.model.init_args.teacher_path == "data/ddpm-cifar10-32"
    assert config.data.init_args.normalize == "symmetric"
    fid = next(c for c in config.trainer.callbacks if c.class_path.endswith("FIDCallback"))
    assert fid.init_args.feature == 2048 and fid.init_args.real == "train"


def test_cifar_config_instantiates_with_a_tiny_ddpm_teacher(tmp_path):
    """Everything built, run=False: the tiny DDPM folder as teacher, FID on a stand-in feature.

    FIDCallback(feature=2048) fetches the Inception weights when built (no network here), so
    the copy of the config gives it an nn.Flatten; the rest is the file's.
    """
    from lightning_losses.cli import main

    write_ddpm_pipeline(tmp_path / "ddpm")
    config = yaml.safe_load(CIFAR_CONFIG.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("FIDCallback"):
            callback["init_args"]["feature"] = {"class_path": "torch.nn.Flatten"}
    (tmp_path / "cifar.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(tmp_path / "cifar.yaml")] + [a.format(tmp=tmp_path) for a in CIFAR_ARGS]
    cli = main(args=args + [f"--model.init_args.teacher_path={tmp_path / 'ddpm'}"], run=False)
    model = cli.model
    assert isinstance(model, DMDDistillation)
    assert isinstance(model.teacher, DiffusersEpsDenoiser)
    assert model.fake_updates_per_generator == 5
    assert model.grad_clip == model.fake_grad_clip == 10.0
    assert model.embedding_loss is not None and model.ema_decay == 0.999
    assert model.supplementary("el").weight == 0.002 and model.el_weight == 0  # composed
    assert all(isinstance(o, torch.optim.AdamW) for o in model.configure_optimizers())
    assert isinstance(cli.datamodule, CIFAR10DataModule) and cli.datamodule.val_size == 0
    assert cli.datamodule.normalize == "symmetric"
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert {"FIDCallback", "SampleGridCallback", "ModelCheckpoint"} <= callbacks.keys()
    assert cli.trainer.precision == "bf16-mixed"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
