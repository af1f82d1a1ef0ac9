"""OPLClassifier: objective, logging, configs through the CLI, resume, DDP, bf16."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import DDP, TinyMLP, ToyImages, assert_spawn_picklable, quiet_trainer

from lightning_losses.cli import LossesCLI, main
from lightning_losses.datamodules import DigitsDataModule
from lightning_losses.losses import orthogonal_projection_loss
from lightning_losses.modules import OPLClassifier, WarmupMultiStepLR

QUIET_ARGS = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(config: Path | str, *args: str) -> LossesCLI:
    """``lightning-losses fit --config config *args`` (quiet) in this process."""
    return main(args=["fit", "--config", str(config), *args, *QUIET_ARGS])


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
    trainer = quiet_trainer(max_epochs=1)
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
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
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
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", limit_val_batches=1)
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


def _ddp_step_and_reference(
    gather: bool, strategy: str = DDP
) -> tuple[OPLClassifier, OPLClassifier, dict]:
    """One SGD step in 2 processes (8 rows each), and one on the 16-row global batch in this one.

    Returns (the DDP-trained model, the one-process reference, the starting state).
    """
    torch.manual_seed(0)
    model = OPLClassifier(
        TinyMLP(8), num_classes=4, opl_weight=1.0, gather_distributed=gather, optimizer=_sgd(0.5)
    )
    reference = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    data = ToyImages(num=32, num_classes=4, batch_size=8)  # 8 per rank = 16 global
    trainer = quiet_trainer(max_steps=1, devices=2, strategy=strategy, limit_val_batches=0)
    trainer.fit(model, data)
    # One process, the global batch: the union of both ranks' first batches.
    x, y = _global_first_batch(data)
    loss, _, _ = reference.compute_loss(reference.features(x), reference(x), y, with_opl=True)
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    return model, reference, start


def test_ddp_step_equals_single_process_step():
    # The one real ddp_spawn run of the suite (the others fork: see tests/fakes.DDP).
    model, reference, start = _ddp_step_and_reference(gather=True, strategy="ddp_spawn")
    moved = False
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=1e-6)
        moved |= not torch.equal(value, start[name])
    assert moved, "the DDP step did not change the parameters"


def test_without_gather_ddp_step_differs_from_global_batch():
    """The control: per-rank OPL (the authors' choice) is not the global-batch gradient."""
    model, reference, _ = _ddp_step_and_reference(gather=False)
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
    cli = _fit(
        repo_root / "configs/opl/digits.yaml",
        "--trainer.fast_dev_run=2",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert cli.trainer.state.finished
    assert isinstance(cli.model, OPLClassifier) and cli.model.num_classes == 10
    assert torch.isfinite(cli.trainer.callback_metrics["train/opl"])


def test_user_subclass_runs_through_the_cli_by_class_path(repo_root, tmp_path):
    cli = _fit(
        repo_root / "configs/opl/digits.yaml",
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
    )
    model = cli.model
    assert type(model).__name__ == "MyClassifier" and model.ce_scale == 3.0
    assert model.epochs_seen == 2
    assert model.opl_weight == 1.0 and model.num_classes == 10  # the config's values reached it


def test_cli_checkpoint_reloads_without_arguments(repo_root, tmp_path):
    _fit(
        repo_root / "configs/opl/digits_ce.yaml",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    model = OPLClassifier.load_from_checkpoint(path)  # the backbone comes from its config
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
    assert model.opl_weight == 0.0


def _resume_matches_a_straight_run(make, path, stop: int, epochs: int, before_resume=None):
    """``make()`` -> a seeded (model, data) pair. One pair trains ``epochs`` epochs straight, one
    ``stop`` epochs and is saved to ``path``, one resumes from there (``before_resume`` sees it
    first) to ``epochs``: its weights equal the straight run's exactly. Returns the three pairs."""

    def trainer(max_epochs, **kwargs):
        return quiet_trainer(max_epochs=max_epochs, deterministic=True, **kwargs)

    straight = make()
    trainer(epochs).fit(*straight)
    stopped = make()
    t = trainer(stop, default_root_dir=path.parent)
    t.fit(*stopped)
    t.save_checkpoint(path)
    resumed = make()
    if before_resume is not None:
        before_resume(*resumed)
    torch.manual_seed(123)  # resuming must not depend on the global RNG
    trainer(epochs).fit(*resumed, ckpt_path=path)
    for name, value in straight[0].state_dict().items():
        torch.testing.assert_close(resumed[0].state_dict()[name], value, rtol=0, atol=0)
    return straight, stopped, resumed


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

    _resume_matches_a_straight_run(make, tmp_path / "epoch1.ckpt", stop=1, epochs=3)


# ------------------------------------------------------------------------------------------
# Base losses: GCE and the truncated Lq loss with pruning weights (issue 10).


def _truncated(**kwargs):
    args = dict(
        num_classes=10,
        base_loss="truncated",
        opl_weight=0.1,
        gamma=2.0,
        abs_mode="pair",
        prune_start_epoch=1,
        prune_every=1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )
    args.update(kwargs)
    return OPLClassifier(TinyMLP(16), **args)


def _noisy_digits(**kwargs):
    args = dict(batch_size=32, seed=0, label_noise=0.4, return_indices=True)
    args.update(kwargs)
    return DigitsDataModule(**args)


def test_gce_and_truncated_objectives():
    from lightning_losses.losses import generalized_cross_entropy, truncated_lq_loss

    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 4
    gce = OPLClassifier(TinyMLP(8), num_classes=4, base_loss="gce", q=0.6, opl_weight=0.0)
    out = gce.training_step((x, y), 0)
    torch.testing.assert_close(out["loss"], generalized_cross_entropy(gce(x), y, q=0.6).loss)

    model = OPLClassifier(TinyMLP(8), num_classes=4, base_loss="truncated", q=0.7, k=0.3)
    model.sample_weights.resize_(20).copy_((torch.arange(20) % 3 == 0).float())
    index = torch.arange(12) + 5
    features = model.features(x)
    logits = model.head(features)
    loss, base, opl = model.compute_loss(features, logits, y, with_opl=True, indices=index)
    weights = model.sample_weights[index]
    expected = truncated_lq_loss(logits, y, q=0.7, k=0.3, weights=weights).loss
    torch.testing.assert_close(base, expected)
    torch.testing.assert_close(loss, expected + model.opl_weight * opl.loss)
    step = model.training_step((x, y, index), 0)["loss"]
    torch.testing.assert_close(step, loss)
    # validation: all weights 1
    _, val_base, _ = model.compute_loss(features, logits, y, with_opl=True)
    torch.testing.assert_close(val_base, truncated_lq_loss(logits, y, q=0.7, k=0.3).loss)
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 20\)"):
        model.compute_loss(features, logits, y, with_opl=False, indices=index + 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"base_loss": "mae"}, "base_loss"),
        ({"q": 0.0}, "q must be"),
        ({"q": 1.5}, "q must be"),
        ({"k": 1.0}, "k must be"),
        ({"k": 0.0}, "k must be"),
        ({"prune_start_epoch": -1}, "prune_start_epoch"),
        ({"prune_every": 0}, "prune_every"),
        ({"prune_every": 2.5}, "prune_every"),
        ({"base_loss": "gce", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_bad_base_loss_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPLClassifier(TinyMLP(8), num_classes=4, **kwargs)


def test_truncated_without_sample_indices_says_how_to_fix_it():
    model = _truncated()
    with pytest.raises(ValueError, match="return_indices=True"):
        model.training_step((torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])), 0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match="return_indices=True"):
        trainer.fit(model, DigitsDataModule(batch_size=64, return_indices=False))


class _SaveAtEpochStart(L.Callback):
    """Saves, per rank, the module's state at the first batch of ``epoch`` (after pruning)."""

    def __init__(self, dirpath: str, epoch: int) -> None:
        self.dirpath = dirpath
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


def _reference_weights(state, data: DigitsDataModule, k: float = 0.5) -> torch.Tensor:
    """w_i = [p_y(x_i) > k] over the whole (noisy) training set, one process, float64."""
    model = _truncated(k=k)
    model.load_state_dict(state)
    model = model.double().eval()
    images, labels = data.train_dataset.tensors
    with torch.no_grad():
        p = F.softmax(model(images.double()), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (p > k).float()


def test_weights_are_p_y_above_k_under_the_current_model_on_schedule(tmp_path):
    L.seed_everything(0, verbose=False)
    model = _truncated(prune_start_epoch=3, prune_every=2)
    data = _noisy_digits()
    epochs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                epochs.append((trainer.current_epoch, int(pl_module.pruned_epoch)))

    save = _SaveAtEpochStart(str(tmp_path), epoch=5)
    trainer = quiet_trainer(max_epochs=6, callbacks=[Record(), save])
    trainer.fit(model, data)
    assert [e for e, _ in epochs] == list(range(6))
    assert [p for _, p in epochs] == [-1, -1, -1, 3, 3, 5]  # start 3, every 2
    state = torch.load(tmp_path / "rank0.pt", weights_only=True)
    weights = state["sample_weights"]
    assert weights.shape == (len(data.train_dataset),)
    torch.testing.assert_close(weights, _reference_weights(state, data), rtol=0, atol=0)
    assert 0.1 < float(weights.mean()) < 0.95  # something was pruned, something kept
    assert trainer.callback_metrics["train/kept"].item() == pytest.approx(float(weights.mean()))
    # the noisy labels are pruned far more often than the clean ones
    noisy = data.train_noise_mask
    assert float(weights[noisy].mean()) < float(weights[~noisy].mean())


def test_truncated_checkpoint_resume_restores_the_weights_exactly(tmp_path):
    def make():
        L.seed_everything(0, verbose=False)
        return _truncated(prune_start_epoch=3), _noisy_digits()

    def still_unpruned(model, data):
        assert model.sample_weights.numel() == 0

    # stopped after 4 epochs (pruned at the start of epoch 3); the resumed run prunes at 4
    (model, data), (model_a, data_a), _ = _resume_matches_a_straight_run(
        make, tmp_path / "epoch4.ckpt", stop=4, epochs=5, before_resume=still_unpruned
    )
    assert model_a.sample_weights.numel() == len(data_a.train_dataset)
    assert model.sample_weights.numel() == len(data.train_dataset)

    # and a plain reload of the checkpoint sizes the buffer
    assert not torch.equal(model.sample_weights, model_a.sample_weights)  # it did prune again
    reloaded = _truncated()
    state = torch.load(tmp_path / "epoch4.ckpt", weights_only=True)["state_dict"]
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded.sample_weights, model_a.sample_weights, rtol=0, atol=0)
    assert int(reloaded.pruned_epoch) == 3


def test_ddp_ranks_hold_the_same_weights_as_one_process(tmp_path):
    L.seed_everything(0, verbose=False)
    # k low so that after one short epoch some weights are 1 and some 0
    model = _truncated(prune_start_epoch=1, prune_every=1, k=0.12)
    data = _noisy_digits(batch_size=32)
    assert_spawn_picklable(model, data)
    trainer = quiet_trainer(
        max_epochs=2,
        devices=2,
        strategy=DDP,
        limit_val_batches=0,
        callbacks=[_SaveAtEpochStart(str(tmp_path), epoch=1)],
    )
    trainer.fit(model, data)
    data.setup()  # the splits were built in the child processes
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["sample_weights"].numel() == len(data.train_dataset) > 0
    torch.testing.assert_close(rank0["sample_weights"], rank1["sample_weights"], rtol=0, atol=0)
    reference = _reference_weights(rank0, data, k=0.12)
    torch.testing.assert_close(rank0["sample_weights"], reference, rtol=0, atol=0)
    assert 0.05 < float(reference.mean()) < 0.95
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0)


NOISE_CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "configs" / "opl").glob("digits_noise_*.yaml")
)


@pytest.mark.parametrize("config", NOISE_CONFIGS, ids=lambda p: p.name)
def test_digits_noise_configs_fast_dev_run(config, tmp_path):
    cli = _fit(config, "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}")
    model, data = cli.model, cli.datamodule
    assert cli.trainer.state.finished and isinstance(model, OPLClassifier)
    assert (model.opl.gamma, model.opl.abs_mode) == (2.0, "pair")
    assert model.opl_weight == (0.1 if "opl" in config.stem else 0.0)
    assert model.base_loss == ("truncated" if "_tl" in config.stem else "ce")
    assert (data.label_noise, data.val_label_noise, data.return_indices) == (0.4, 0.4, True)
    assert int(data.train_noise_mask.sum()) == round(0.4 * len(data.train_dataset))
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


@pytest.mark.parametrize(
    ("name", "classes", "noise", "milestones", "prune"),
    [
        ("cifar10_noise_tl_opl.yaml", 10, "symmetric", [40, 80], 40),
        ("cifar100_noise_tl_opl.yaml", 100, "pairflip", [80, 120], 80),
    ],
)
def test_cifar_noise_configs_parse_to_the_authors_recipe(
    repo_root, tmp_path, name, classes, noise, milestones, prune
):
    args = ["--config", str(repo_root / "configs/opl" / name), "--trainer.accelerator=cpu"]
    args += ["--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"]
    cli = main(args=args, run=False)  # no data needed to build the objects
    model, data = cli.model, cli.datamodule
    assert model.num_classes == data.num_classes == classes
    assert (model.base_loss, model.q, model.k) == ("truncated", 0.7, 0.5)
    assert (model.prune_start_epoch, model.prune_every, model.opl_weight) == (prune, 10, 0.1)
    assert model.feature_dim == 512
    assert (data.rate, data.noise_type, data.val_label_noise) == (0.4, noise, 0.4)
    assert data.datamodule.return_indices and data.datamodule.batch_size == 128
    optimizer = model.configure_optimizers()
    group = optimizer["optimizer"].param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-4)
    assert sorted(optimizer["lr_scheduler"]["scheduler"].milestones) == milestones
