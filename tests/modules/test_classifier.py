"""OPLClassifier: objective, logging, configs through the CLI, resume, DDP, bf16."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import TinyMLP, ToyImages

from lightning_losses.cli import main
from lightning_losses.datamodules import DigitsDataModule
from lightning_losses.losses import orthogonal_projection_loss
from lightning_losses.modules import OPLClassifier, WarmupMultiStepLR

QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,  # nothing written into the working directory
}
QUIET_ARGS = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _sgd(lr: float = 0.5):
    return functools.partial(torch.optim.SGD, lr=lr)


def test_training_loss_is_ce_plus_weighted_opl():
    torch.manual_seed(0)
    model = OPLClassifier(TinyMLP(8), num_classes=4, opl_weight=0.7, gamma=0.3, abs_mode="pair")
    x = torch.randn(12, 1, 8, 8)
    y = torch.arange(12) % 4
    features = model.backbone(x)
    logits = model.head(features)
    expected = (
        F.cross_entropy(logits, y) + 0.7 * orthogonal_projection_loss(features, y, 0.3, "pair").loss
    )
    loss, ce, opl = model.compute_loss(features, logits, y, with_opl=True)
    torch.testing.assert_close(loss, expected)
    assert opl is not None and ce.item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_zero_weight_is_plain_cross_entropy():
    model = OPLClassifier(TinyMLP(8), num_classes=4, opl_weight=0.0, label_smoothing=0.1)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = model.training_step((x, y), 0)
    expected = F.cross_entropy(model(x), y, label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"opl_weight": -1.0}, "opl_weight"),
        ({"num_classes": 1}, "num_classes"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"abs_mode": "abs"}, "abs_mode"),
        ({"gamma": -0.5}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
        ({"eps": -1e-6}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"num_classes": 2.5}, "num_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"backbone": TinyMLP(8), "num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        OPLClassifier(**args)


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.tensor([0, 1, 2, 4]), r"in \[0, 4\)"),
        (torch.tensor([0, -1, 2, 3]), r"in \[0, 4\)"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer tensor"),
        (torch.tensor([0, 1, 2]), "4 entries"),
    ],
)
def test_bad_labels_give_a_clear_value_error(labels, match):
    model = OPLClassifier(TinyMLP(8), num_classes=4, opl_weight=0.5)
    x = torch.randn(4, 1, 8, 8)
    for step in (model.training_step, model.validation_step):
        with pytest.raises(ValueError, match=match):
            step((x, labels), 0)


def test_backbone_without_feature_dim_needs_it_explicitly():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(ValueError, match="feature_dim"):
        OPLClassifier(plain, num_classes=3)
    model = OPLClassifier(plain, num_classes=3, feature_dim=5)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    wrong = OPLClassifier(plain, num_classes=3, feature_dim=7)
    with pytest.raises(ValueError, match=r"\(B, 7\) features"):
        wrong(torch.randn(2, 1, 8, 8))


def test_warmup_multistep_factors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupMultiStepLR(opt, milestones=[3, 5], gamma=0.2, warmup=2, warmup_factor=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1, 0.55, 1.0, 0.2, 0.2, 0.04, 0.04]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="milestones"):
        WarmupMultiStepLR(opt, milestones=[5, 3])


def test_logs_every_part_for_each_stage():
    model = OPLClassifier(TinyMLP(8), num_classes=6, optimizer=_sgd(0.1))
    data = ToyImages(num=48, num_classes=6, batch_size=16)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", **QUIET)
    trainer.fit(model, data)
    after_fit = set(trainer.callback_metrics)
    trainer.test(model, data, verbose=False)
    after_test = set(trainer.callback_metrics)
    parts = ("loss", "ce", "opl", "opl_s", "opl_d")
    assert {f"train/{n}_epoch" for n in parts} | {"train/acc", "train/acc_top5"} <= after_fit
    assert {f"val/{n}" for n in (*parts, "acc", "acc_top5")} <= after_fit
    assert {f"test/{n}" for n in (*parts, "acc", "acc_top5")} <= after_test


def test_feature_geometry_callback_matches_direct_computation(tmp_path):
    from lightning_losses.callbacks import FeatureGeometryCallback

    torch.manual_seed(0)
    model = OPLClassifier(TinyMLP(8), num_classes=4, optimizer=_sgd(0.1))
    data = ToyImages(num=40, num_classes=4, batch_size=16)  # uneven last batch
    callback = FeatureGeometryCallback(plot_every_n_epochs=1, dirpath=str(tmp_path))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback], **QUIET)
    trainer.fit(model, data)
    with torch.no_grad():
        f = F.normalize(model.features(data.images).double(), dim=1)
    gram = f @ f.T
    same = data.labels[:, None] == data.labels[None, :]
    eye = torch.eye(len(f), dtype=torch.bool)
    intra = gram[same & ~eye].mean().item()
    inter = gram[~same].mean().item()
    metrics = trainer.callback_metrics
    assert metrics["val/intra_cos"].item() == pytest.approx(intra, abs=1e-5)
    assert metrics["val/inter_cos"].item() == pytest.approx(inter, abs=1e-5)
    assert metrics["val/cos_gap"].item() == pytest.approx(intra - inter, abs=1e-5)
    assert (tmp_path / "val_epoch000.png").stat().st_size > 1000


def test_bf16_mixed_fit_runs_and_stays_finite():
    model = OPLClassifier(TinyMLP(8), num_classes=4, optimizer=_sgd(0.1))
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", precision="bf16-mixed", limit_val_batches=1, **QUIET
    )
    trainer.fit(model, ToyImages(num=48, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert torch.isfinite(trainer.callback_metrics["val/opl"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# Two-process DDP: one training step equals one single-process step on the global batch.


def _global_first_batch(data: ToyImages, world: int = 2):
    """Lightning shuffles DDP training data with DistributedSampler(seed=0): rebuild its split."""
    from torch.utils.data import DistributedSampler, TensorDataset

    dataset = TensorDataset(data.images, data.labels)
    index = torch.cat(
        [
            torch.tensor(list(DistributedSampler(dataset, world, rank, shuffle=True, seed=0)))[
                : data.batch_size
            ]
            for rank in range(world)
        ]
    )
    return data.images[index], data.labels[index]


def test_ddp_step_equals_single_process_step():
    torch.manual_seed(0)
    model = OPLClassifier(
        TinyMLP(8), num_classes=4, opl_weight=1.0, gather_distributed=True, optimizer=_sgd(0.5)
    )
    reference = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    data = ToyImages(num=32, num_classes=4, batch_size=8)  # 8 per rank = 16 global

    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **QUIET,
    )
    trainer.fit(model, data)

    # One process, the global batch: the union of both ranks' first batches.
    x, y = _global_first_batch(data)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    loss, _, _ = reference.compute_loss(reference.features(x), reference(x), y, with_opl=True)
    loss.backward()
    optimizer.step()

    moved = False
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=1e-6)
        moved |= not torch.equal(value, start[name])
    assert moved, "the DDP step did not change the parameters"


def test_without_gather_ddp_step_differs_from_global_batch():
    """The control: per-rank OPL (the authors' choice) is not the global-batch gradient."""
    torch.manual_seed(0)
    model = OPLClassifier(TinyMLP(8), num_classes=4, gather_distributed=False, optimizer=_sgd(0.5))
    reference = copy.deepcopy(model)
    data = ToyImages(num=32, num_classes=4, batch_size=8)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **QUIET,
    )
    trainer.fit(model, data)
    x, y = _global_first_batch(data)
    loss, _, _ = reference.compute_loss(reference.features(x), reference(x), y, with_opl=True)
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    diffs = [
        (value - reference.state_dict()[name]).abs().max().item()
        for name, value in model.state_dict().items()
    ]
    assert max(diffs) > 1e-5


# ------------------------------------------------------------------------------------------
# Configs through the CLI, in-process.

# The calibration configs need a classifier checkpoint: tests/modules/test_calibration.py.
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "opl").glob("*.yaml"))


def _folder_tree(root: Path, classes: int = 3) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (40 * c, 0, 0)).save(folder / "a.png")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_instantiates(config, tmp_path):
    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    args += ["--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path}"]
    text = config.read_text()
    if "ImageFolderDataModule" in text:
        _folder_tree(tmp_path / "imagenet")
        args.append(f"--data.init_args.root={tmp_path / 'imagenet'}")
    cli = main(args=args, run=False)
    assert isinstance(cli.model, L.LightningModule)
    if isinstance(cli.model, OPLClassifier):
        assert cli.model.num_classes == cli.datamodule.num_classes


def test_digits_config_fast_dev_run(repo_root, tmp_path):
    cli = main(
        args=[
            "fit",
            "--config",
            str(repo_root / "configs/opl/digits.yaml"),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET_ARGS,
        ]
    )
    assert cli.trainer.state.finished
    assert isinstance(cli.model, OPLClassifier) and cli.model.num_classes == 10
    assert torch.isfinite(cli.trainer.callback_metrics["train/opl"])


def test_user_subclass_runs_through_the_cli_by_class_path(repo_root, tmp_path):
    cli = main(
        args=[
            "fit",
            "--config",
            str(repo_root / "configs/opl/digits.yaml"),
            "--model",
            "user_project.MyClassifier",
            "--model.init_args.ce_scale=3.0",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET_ARGS,
        ]
    )
    model = cli.model
    assert type(model).__name__ == "MyClassifier" and model.ce_scale == 3.0
    assert model.epochs_seen == 2
    assert model.opl_weight == 1.0 and model.num_classes == 10  # the config's values reached it


def test_cli_checkpoint_reloads_without_arguments(repo_root, tmp_path):
    main(
        args=[
            "fit",
            "--config",
            str(repo_root / "configs/opl/digits_ce.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--trainer.callbacks.dirpath={tmp_path}/ckpt",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *QUIET_ARGS,
        ]
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    model = OPLClassifier.load_from_checkpoint(path)  # the backbone comes from its config
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    assert model.opl_weight == 0.0


def test_checkpoint_resume_reaches_the_same_state(tmp_path):
    def make():
        L.seed_everything(0, verbose=False)
        model = OPLClassifier(
            TinyMLP(16),
            num_classes=10,
            optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1),
        )
        data = DigitsDataModule(batch_size=128, seed=0)
        return model, data

    def trainer(epochs, **kwargs):
        return L.Trainer(
            max_epochs=epochs, accelerator="cpu", deterministic=True, **QUIET, **kwargs
        )

    model, data = make()
    trainer(3).fit(model, data)

    model_a, data_a = make()
    t = trainer(1, default_root_dir=tmp_path)
    t.fit(model_a, data_a)
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    model_b, data_b = make()
    torch.manual_seed(123)  # resuming must not depend on the global RNG
    trainer(3).fit(model_b, data_b, ckpt_path=tmp_path / "epoch1.ckpt")

    for name, value in model.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[name], value, rtol=0, atol=0)
