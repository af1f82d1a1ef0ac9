"""PostHocCalibration and CalibrationCallback.

A frozen classifier, its cached logits, temperature scaling / CA / CE calibrators fitted through
Lightning, test metrics equal to the functional ones on whole sets, checkpoints and configs
through the CLI, bf16, and 2-process DDP (``ddp_fork``, gloo) on the CPU.
"""

from __future__ import annotations

import copy
import faulthandler
import functools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from fakes import DDP, TinyMLP, ToyImages, assert_spawn_picklable, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from lightning_losses import metrics
from lightning_losses.callbacks import CalibrationCallback
from lightning_losses.cli import LossesCLI, main
from lightning_losses.datamodules import CalibrationDataModule, DigitsDataModule
from lightning_losses.losses.calibration import correctness_aware_loss
from lightning_losses.modules import OPLClassifier, PostHocCalibration
from lightning_losses.nets import (
    CorrectnessAwareCalibrator,
    HistogramBinning,
    SmallCNN,
    TemperatureScaling,
    VectorScaling,
    fit_temperature,
)

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_CONFIGS = sorted((REPO / "configs" / "calibration").glob("*.yaml"))
QUIET_ARGS = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# The digits split of configs/opl/digits_ce.yaml and of the calibration configs.
DIGITS = {"val_fraction": 0.35, "test_fraction": 0.2, "seed": 0}
KEYS = (
    "acc",
    "ece",
    "ece25",
    "adaptive_ece",
    "classwise_ece",
    "nll",
    "brier",
    "top_label_brier",
    "auroc",
)


# ------------------------------------------------------------------------------------------
# Helpers (module level: ddp_spawn pickles what the children need).


class ScaledLogits(nn.Module):
    """A planted over-confident classifier: the wrapped classifier's logits times ``factor``."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return self.factor * self.net(x)


class LogitsOnly(ScaledLogits, L.LightningModule):
    """A classification module (the wrapped classifier's logits, unscaled: times 1.0 exactly)
    whose validation / test steps return nothing."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__(net, 1.0)
        self.num_classes = num_classes

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None


class Watchdog(L.Callback):
    """Turns a hung rank into a failure: it exits, printing every thread's stack."""

    def __init__(self, seconds: float = 120.0) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage):
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def teardown(self, trainer, pl_module, stage):
        faulthandler.cancel_dump_traceback_later()


def _digits_net() -> nn.Sequential:
    """A digits classifier with BatchNorm and Dropout (so eval mode matters), trained briefly on
    the training split only (~95% test accuracy: every test set has wrong predictions)."""
    digits = DigitsDataModule(**DIGITS)
    digits.setup("fit")
    x, y = digits.train_dataset.tensors
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def trained_net() -> nn.Sequential:
    return _digits_net()


@pytest.fixture
def net(trained_net) -> nn.Sequential:
    return copy.deepcopy(trained_net)


def _shift_right(image: Tensor) -> Tensor:
    return torch.roll(image, 1, dims=-1)


def _shift_down(image: Tensor) -> Tensor:
    return torch.roll(image, 1, dims=-2)


def _dimmed(image: Tensor) -> Tensor:
    return 0.8 * image


# Three cheap deterministic views (~7x faster than the default torchvision views, which
# test_cached_logits_equal_a_fresh_forward_of_the_calibration_split runs through the module).
CHEAP_VIEWS = (_shift_right, _shift_down, _dimmed)


class FirstFiveDigits(TensorDataset):
    """Test digits 0-4 whose predictions compete among those 5 classes only (as ImageNet-A / -R
    compete among their 200 classes): the data module reads ``class_subset``."""

    class_subset = [0, 1, 2, 3, 4]


def _first_five_digits() -> FirstFiveDigits:
    digits = DigitsDataModule(**DIGITS)
    digits.setup("test")
    x, y = digits.test_dataset.tensors
    keep = y < 5
    return FirstFiveDigits(x[keep].clone(), y[keep].clone())


def _flipped_digits(n: int) -> TensorDataset:
    """An extra (OOD-like) test set: the first ``n`` test digits mirrored left-right."""
    digits = DigitsDataModule(**DIGITS)
    digits.setup("test")
    x, y = digits.test_dataset.tensors
    return TensorDataset(x[:n].flip(-1).clone(), y[:n].clone())


def _data(
    views: bool = True,
    batch_size: int = 64,
    shifts: tuple[str, ...] | None = ("rotation",),
    severities: tuple[int, ...] = (3,),
    ood: dict | None = None,
    view_transforms: tuple | None = CHEAP_VIEWS,
) -> CalibrationDataModule:
    return CalibrationDataModule(
        DigitsDataModule(**DIGITS),
        views=views,
        view_transforms=view_transforms if views else None,
        batch_size=batch_size,
        shifts=shifts,
        severities=severities,
        ood_datasets=ood,
    )


def _floats(logged) -> dict[str, float]:
    return {name: float(value) for name, value in logged.items()}


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before: dict[str, Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items())


@torch.no_grad()
def _probs(
    module: PostHocCalibration, loader, class_subset: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(calibrated probs, uncalibrated probs, labels) of a whole test loader, by hand; with
    ``class_subset``, every other class gets the logit -inf (in the views too)."""
    calibrated, uncalibrated, labels = [], [], []
    for batch in loader:
        images, views, y = batch if len(batch) == 3 else (batch[0], None, batch[1])
        logits, view_logits = module.classifier_logits(images, views)
        if class_subset is not None:
            outside = torch.ones(logits.shape[1], dtype=torch.bool)
            outside[class_subset] = False
            logits = logits.masked_fill(outside, -math.inf)
            view_logits = view_logits.masked_fill(outside, -math.inf)
        calibrated.append(module(logits, view_logits).softmax(dim=1))
        uncalibrated.append(logits.softmax(dim=1))
        labels.append(y)
    return torch.cat(calibrated), torch.cat(uncalibrated), torch.cat(labels)


def _reference(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Every logged metric, computed by the functional metrics on a whole set at once."""
    return {
        "acc": (probs.argmax(dim=1) == labels).double().mean().item(),
        "ece": metrics.calibration_error(probs, labels, 15).item(),
        "ece25": metrics.calibration_error(probs, labels, 25).item(),
        "adaptive_ece": metrics.calibration_error(probs, labels, 15, "quantile").item(),
        "classwise_ece": metrics.classwise_calibration_error(probs, labels, 15).item(),
        "nll": metrics.negative_log_likelihood(probs, labels).item(),
        "brier": metrics.brier_score(probs, labels).item(),
        "top_label_brier": metrics.brier_score(probs, labels, top_label=True).item(),
        "auroc": metrics.correctness_auroc(probs, labels).item(),
    }


# ------------------------------------------------------------------------------------------
# 1-2. The frozen classifier and its cached logits.


@pytest.mark.parametrize("source", ["cached", "images"])
def test_classifier_stays_frozen_and_only_the_calibrator_moves(net, source):
    if source == "cached":  # CalibrationDataModule: the classifier runs once, in setup
        data = _data(shifts=None)
        module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss="ca")
    else:  # a plain data module of images: the classifier runs in every training step
        data = ToyImages(num=64, num_classes=10, batch_size=16)
        module = PostHocCalibration(TemperatureScaling(), 10, classifier=net, loss="ce")
    classifier_before = _state(module.classifier)  # BatchNorm running stats included
    calibrator_before = _state(module.calibrator)
    module.train()  # as a user (or another Lightning version) may do before fitting
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, data)

    for name, value in module.classifier.state_dict().items():
        assert torch.equal(value, classifier_before[name]), name
    assert all(not p.requires_grad for p in module.classifier.parameters())
    assert not any(m.training for m in module.classifier.modules())
    module.train()
    assert module.training and module.calibrator.training
    assert not any(m.training for m in module.classifier.modules())
    assert _changed(calibrator_before, module.calibrator)


def test_cached_logits_equal_a_fresh_forward_of_the_calibration_split(net):
    reference = copy.deepcopy(net).eval()
    data = _data(shifts=None, view_transforms=None)  # the default torchvision views
    module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss="ca")
    quiet_trainer(max_epochs=1).fit(module, data)

    val_x, val_y = data.datamodule.val_dataset.tensors
    for split, index in (("train", data.calibration_indices), ("val", data.heldout_indices)):
        cached = data.cached[split]
        assert len(cached) == len(index) > 0
        with torch.no_grad():
            torch.testing.assert_close(cached.logits, reference(val_x[index]))
        assert torch.equal(cached.labels, val_y[index])
    cached = data.cached["train"]
    n = len(cached)
    assert cached.view_logits.shape == (n, 3, 10)  # per item (V, C); batches are (V, B, C)
    with torch.no_grad():
        for i in (0, 1, n - 1):
            image, views, label = data.train_dataset[i]
            torch.testing.assert_close(cached.logits[i], reference(image[None])[0])
            torch.testing.assert_close(cached.view_logits[i], reference(views))
            assert int(cached.labels[i]) == int(label)

    # After the fit's setup the cached batches carry the CA calibrator's inputs, computed
    # once: (B, k V) features, no views' logits.
    batch = next(iter(data.train_dataloader()))
    b = batch["logits"].shape[0]
    assert "view_logits" not in batch and batch["features"].shape == (b, 12) and b == 64
    expected = module.calibrator.features(cached.logits, cached.view_logits.transpose(0, 1))
    for column in range(b):
        rows = (cached.logits == batch["logits"][column]).all(dim=1).nonzero().flatten()
        assert len(rows) == 1
        assert torch.equal(batch["features"][column], expected[rows[0]])
        assert batch["labels"][column] == cached.labels[rows[0]]

    # Without features: view_logits (V, B, C), column b belongs to logits row b.
    cached.features = None
    batch = next(iter(data.train_dataloader()))
    assert batch["view_logits"].shape == (3, b, 10)
    for column in range(b):
        rows = (cached.logits == batch["logits"][column]).all(dim=1).nonzero().flatten()
        assert torch.equal(batch["view_logits"][:, column], cached.view_logits[rows[0]])

    # The module's own image path gives the same (V, N, C) order.
    images, views, _ = default_collate([data.train_dataset[i] for i in range(5)])
    logits, view_logits = module.classifier_logits(images, views)
    assert view_logits.shape == (3, 5, 10)
    with torch.no_grad():
        for j in range(3):
            torch.testing.assert_close(view_logits[j], reference(views[:, j]))
    torch.testing.assert_close(logits, cached.logits[:5])


def test_fit_setup_moves_the_classifier_to_the_module_device_before_caching(net):
    # Regression (on an accelerator): Lightning calls setup with self.device already the target
    # device (its _call_setup_hook sets _device) while the weights are still on the CPU, and
    # moves the module only after setup. Emulated on the CPU with the meta device.
    seen = {}

    class Recorder:
        def cache_outputs(self, fn, device=None):
            seen["batches"] = torch.device(device)
            tensors = [*module.classifier.parameters(), *module.classifier.buffers()]
            seen["classifier"] = {t.device for t in tensors}

    module = PostHocCalibration(TemperatureScaling(), 10, classifier=net)
    module._trainer = SimpleNamespace(datamodule=Recorder())
    module._device = torch.device("meta")
    module.setup("fit")
    assert seen == {"batches": torch.device("meta"), "classifier": {torch.device("meta")}}


# ------------------------------------------------------------------------------------------
# 3. Temperature scaling through the module.


def test_temperature_scaling_matches_fit_temperature_and_fixes_overconfidence(net):
    data = _data(views=False, batch_size=4096, shifts=None)  # one full batch
    overconfident = ScaledLogits(net, 4.0)
    module = PostHocCalibration(TemperatureScaling(), 10, classifier=overconfident, loss="ce")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data)
    assert trainer.num_training_batches == 1

    cached = data.cached["train"]
    fitted = module.calibrator.scalar_temperature().item()
    expected = fit_temperature(cached.logits, cached.labels).scalar_temperature().item()
    assert fitted == pytest.approx(expected, abs=1e-3)
    # NLL(4 z / T) = NLL(z / (T / 4)): the planted factor comes back in the temperature.
    base = fit_temperature(cached.logits / 4, cached.labels).scalar_temperature().item()
    assert fitted == pytest.approx(4 * base, rel=1e-3)
    assert fitted > 1.5

    trainer.test(module, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    assert logged["test/id/ece"] < logged["test/id/uncal_ece"]
    assert logged["test/id/nll"] < logged["test/id/uncal_nll"]


# ------------------------------------------------------------------------------------------
# 4-5. CA and CE calibrators: fit + test on digits, metrics exact over whole sets.


@pytest.mark.parametrize("loss", ["ca", "ce"])
def test_ca_and_ce_calibrators_fit_and_test_every_set(net, loss):
    data = _data(
        shifts=("rotation", "gaussian_noise"),
        severities=(5,),
        ood={"flipped": _flipped_digits(120)},
    )
    module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss=loss)
    start = copy.deepcopy(module.calibrator)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(module, data)

    # The objective went down on the calibration split.
    cached = data.cached["train"]
    view_logits = cached.view_logits.transpose(0, 1)
    with torch.no_grad():
        before = module.loss_fn(start(cached.logits, view_logits), cached.labels)
        after = module.loss_fn(module(cached.logits, view_logits), cached.labels)
    assert after < before

    trainer.test(module, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    names = data.test_set_names
    assert names == ["id", "rotation-5", "gaussian_noise-5", "flipped"]
    expected = {
        f"test/{name}/{prefix}{key}" for name in names for prefix in ("", "uncal_") for key in KEYS
    }
    assert set(logged) == expected
    assert all(math.isfinite(value) for value in logged.values())
    for name in names:  # T > 0 never changes the argmax
        assert logged[f"test/{name}/acc"] == logged[f"test/{name}/uncal_acc"]
        assert 0 < logged[f"test/{name}/acc"] < 1
        assert logged[f"test/{name}/nll"] != logged[f"test/{name}/uncal_nll"]


def test_logged_metrics_equal_functional_metrics_on_whole_test_sets(net):
    data = _data(shifts=("contrast",), severities=(5,), ood={"first5": _first_five_digits()})
    module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss="ca")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    logged = _floats(trainer.callback_metrics)

    assert data.test_set_names == ["id", "contrast-5", "first5"]
    for name, loader, subset in zip(
        data.test_set_names, data.test_dataloader(), data.test_class_subsets
    ):
        calibrated, uncalibrated, labels = _probs(module, loader, subset)
        if subset is None:
            assert len(labels) == 359  # 5 batches of 64 and one of 39
        else:  # no probability outside the subset
            assert calibrated[:, 5:].sum() == 0 and len(labels) % 64 != 0
        for prefix, probs in (("", calibrated), ("uncal_", uncalibrated)):
            for key, value in _reference(probs, labels).items():
                assert logged[f"test/{name}/{prefix}{key}"] == pytest.approx(value, abs=1e-6), (
                    name,
                    prefix + key,
                )
        if name == "id":  # the control: a mean of per-batch ECEs is another number
            per_batch = [
                metrics.calibration_error(calibrated[i : i + 64], labels[i : i + 64]).item()
                for i in range(0, len(labels), 64)
            ]
            assert abs(sum(per_batch) / len(per_batch) - logged["test/id/ece"]) > 1e-3


# ------------------------------------------------------------------------------------------
# 6-7. Checkpoints and configs through the CLI.


@pytest.fixture(scope="module")
def digits_ce_checkpoint(tmp_path_factory) -> Path:
    """configs/opl/digits_ce.yaml trained for 2 steps: an OPLClassifier (SmallCNN) checkpoint."""
    root = tmp_path_factory.mktemp("digits_ce")
    main(
        args=[
            "fit",
            "--config",
            str(REPO / "configs/opl/digits_ce.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={root}",
            f"--trainer.callbacks.dirpath={root}/ckpt",
            f"--trainer.logger.init_args.save_dir={root}",
            *QUIET_ARGS,
        ]
    )
    path = root / "ckpt" / "last.ckpt"
    assert path.is_file()
    return path


def test_classifier_loads_from_an_opl_checkpoint(digits_ce_checkpoint):
    state = torch.load(digits_ce_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    loaded = PostHocCalibration(
        TemperatureScaling(), 10, classifier_checkpoint=str(digits_ce_checkpoint)
    )
    given = OPLClassifier(SmallCNN(1, 32, 64), num_classes=10)
    into_given = PostHocCalibration(
        TemperatureScaling(), 10, classifier=given, classifier_checkpoint=str(digits_ce_checkpoint)
    )
    for module in (loaded, into_given):
        assert isinstance(module.classifier, OPLClassifier)
        classifier_state = module.classifier.state_dict()
        assert set(classifier_state) == set(state)
        for name, value in classifier_state.items():
            assert torch.equal(value, state[name]), name
        assert not any(m.training for m in module.classifier.modules())
        assert all(not p.requires_grad for p in module.classifier.parameters())


def test_config_run_fits_then_tests(digits_ce_checkpoint, tmp_path):
    cli = main(
        args=[
            "fit",
            "--config",
            str(REPO / "configs/calibration/digits_ts.yaml"),
            f"--model.init_args.classifier_checkpoint={digits_ce_checkpoint}",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.shifts=[rotation]",
            "--data.init_args.severities=[1]",
            *QUIET_ARGS,
        ]
    )
    assert cli.trainer.state.fn == "test" and cli.trainer.state.finished  # test_after_fit
    assert cli.trainer.current_epoch == 1  # the fit ran first
    logged = _floats(cli.trainer.callback_metrics)
    assert math.isfinite(logged["test/id/ece"]) and math.isfinite(logged["test/rotation-1/ece"])
    csv = (tmp_path / "digits_ts" / "version_0" / "metrics.csv").read_text()
    assert "test/id/ece" in csv.splitlines()[0]
    # The config's batch size gives one full batch: exactly fit_temperature's optimum.
    cached = cli.datamodule.cached["train"]
    expected = fit_temperature(cached.logits, cached.labels).scalar_temperature().item()
    assert cli.model.calibrator.scalar_temperature().item() == pytest.approx(expected, abs=1e-3)


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    missing = tmp_path / "runs/opl/digits_ce/checkpoints/last.ckpt"
    command = "lightning-losses fit --config configs/opl/digits_ce.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        PostHocCalibration(TemperatureScaling(), 10, classifier_checkpoint=str(missing))
    with pytest.raises(FileNotFoundError, match="other.ckpt") as error:
        PostHocCalibration(
            TemperatureScaling(), 10, classifier_checkpoint=str(tmp_path / "other.ckpt")
        )
    assert "lightning-losses" not in str(error.value)


class ParseOnlyCLI(LossesCLI):
    """Parses and validates a config (class paths, argument names and types); builds nothing."""

    def instantiate_classes(self) -> None:
        pass


def _parse_only(args: list[str]) -> ParseOnlyCLI:
    # The keyword arguments of lightning_losses.cli.main.
    return ParseOnlyCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=False,
    )


DIGITS_CONFIGS = [c for c in CALIBRATION_CONFIGS if "/path/to" not in c.read_text()]
PLACEHOLDER_CONFIGS = [c for c in CALIBRATION_CONFIGS if "/path/to" in c.read_text()]


def test_every_calibration_config_is_covered():
    assert {c.name for c in DIGITS_CONFIGS} == {
        "digits_ts.yaml",
        "digits_ce.yaml",
        "digits_ca.yaml",
        "digits_isotonic.yaml",
    }
    assert {c.name for c in PLACEHOLDER_CONFIGS} == {"imagenet_ca.yaml"}


@pytest.mark.parametrize("config", DIGITS_CONFIGS, ids=lambda p: p.name)
def test_digits_configs_instantiate(config, digits_ce_checkpoint, tmp_path):
    cli = main(
        args=[
            "--config",
            str(config),
            f"--model.init_args.classifier_checkpoint={digits_ce_checkpoint}",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run=False,
    )
    model, data = cli.model, cli.datamodule
    assert isinstance(model, PostHocCalibration) and model.num_classes == data.num_classes == 10
    assert isinstance(model.classifier, OPLClassifier) and model.test_after_fit
    assert data.views == model.calibrator.requires_views
    if isinstance(model.calibrator, TemperatureScaling):  # one full LBFGS batch
        assert data.batch_size >= round(data.calibration_fraction * round(0.35 * 1797))
    # The calibration data must be the classifier's validation data, never its training data.
    wrapped = yaml.safe_load(config.read_text())["data"]["init_args"]["datamodule"]["init_args"]
    trained = yaml.safe_load((REPO / "configs/opl/digits_ce.yaml").read_text())
    for key in ("image_size", "val_fraction", "test_fraction", "seed"):
        assert wrapped[key] == trained["data"]["init_args"][key], key


@pytest.mark.parametrize("config", PLACEHOLDER_CONFIGS, ids=lambda p: p.name)
def test_placeholder_configs_parse(config, tmp_path):
    cli = _parse_only(["--config", str(config)])
    assert not hasattr(cli, "model")
    parsed = cli.config
    assert parsed.model.class_path == "lightning_losses.modules.PostHocCalibration"
    calibrator = parsed.model.init_args.calibrator
    assert calibrator.class_path == "lightning_losses.nets.CorrectnessAwareCalibrator"
    assert parsed.model.init_args.loss == "ca"
    ood = parsed.data.init_args.ood_datasets
    assert set(ood) == {"imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2"}
    for entry in ood.values():  # the class was resolved: its defaults were filled in
        assert entry.class_path == "lightning_losses.datamodules.ImageNetVariantFolder"
        assert entry.init_args.image_size == 224
    # The control: the same parser rejects a misspelt argument.
    broken = tmp_path / config.name
    broken.write_text(config.read_text().replace("calibration_fraction:", "calibration_fractio:"))
    with pytest.raises(SystemExit):
        _parse_only(["--config", str(broken)])


# ------------------------------------------------------------------------------------------
# 8-9. Bad arguments; fast_dev_run with every calibrator; bf16.


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss": "focal"}, "loss"),
        ({"calibrator": nn.Linear(10, 10)}, "calibrator"),
        ({"classifier": None}, "classifier"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"calibrator": TemperatureScaling(), "num_classes": 10, "classifier": nn.Flatten()}
    with pytest.raises(ValueError, match=match):
        PostHocCalibration(**{**args, **kwargs})


@pytest.mark.parametrize(
    "calibrator,loss",
    [("ts", "ce"), ("ca", "ca"), ("ca", "ce"), ("ca", "mse")],
)
def test_fast_dev_run(net, calibrator, loss):
    views = calibrator == "ca"
    head = CorrectnessAwareCalibrator(3) if views else TemperatureScaling()
    data = _data(views=views, shifts=("rotation",), severities=(1,))
    module = PostHocCalibration(head, 10, classifier=net, loss=loss)
    start = _state(module.calibrator)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(module, data)
    assert _changed(start, module.calibrator)
    trainer.test(module, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    for name in ("id", "rotation-1"):
        assert math.isfinite(logged[f"test/{name}/ece"])
        assert math.isfinite(logged[f"test/{name}/uncal_nll"])


def test_bf16_mixed_fit_and_test_stay_finite(net):
    data = _data(shifts=("rotation",), severities=(3,))
    module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss="ca")
    start = _state(module.calibrator)
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed")
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    assert len(logged) == 2 * 2 * len(KEYS)
    assert all(math.isfinite(value) for value in logged.values())
    assert logged["test/id/acc"] == logged["test/id/uncal_acc"]
    assert _changed(start, module.calibrator)
    assert all(torch.isfinite(p).all() for p in module.calibrator.parameters())


# ------------------------------------------------------------------------------------------
# 10. CalibrationCallback on any classification module.


def test_calibration_callback_matches_functional_metrics(tmp_path):
    torch.manual_seed(0)
    model = OPLClassifier(
        TinyMLP(8), num_classes=4, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    data = ToyImages(num=60, num_classes=4, batch_size=16)  # 3 batches of 16 and one of 12
    callback = CalibrationCallback(dirpath=str(tmp_path / "opl"))
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], num_sanity_val_steps=2)
    trainer.fit(model, data)  # the sanity check's batches must not count

    with torch.no_grad():
        probs = model(data.images).softmax(dim=1)
    expected = _reference(probs, data.labels)
    assert 0 < expected.pop("acc") < 1
    logged = _floats(trainer.callback_metrics)
    for key, value in expected.items():
        assert logged[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
    assert [p.name for p in sorted((tmp_path / "opl").glob("*.png"))] == ["val_epoch000.png"]
    assert (tmp_path / "opl" / "val_epoch000.png").stat().st_size > 1000

    trainer.test(model, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    for key, value in expected.items():
        assert logged[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert len(list((tmp_path / "opl").glob("test_*.png"))) == 1

    # validation_step returns None: the callback calls the module on the batch itself.
    fallback = LogitsOnly(model, num_classes=4)
    callback = CalibrationCallback(dirpath=str(tmp_path / "plain"))
    trainer = quiet_trainer(callbacks=[callback])
    trainer.validate(fallback, data, verbose=False)
    logged = _floats(trainer.callback_metrics)
    for key, value in expected.items():
        assert logged[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
    assert (tmp_path / "plain" / "val_epoch000.png").is_file()


# ------------------------------------------------------------------------------------------
# 11. Two processes (ddp_fork, gloo) on the CPU.


def _ddp_trainer(**kwargs) -> L.Trainer:
    return quiet_trainer(devices=2, strategy=DDP, callbacks=[Watchdog()], **kwargs)


def test_ddp_fit_and_test_match_one_process(net):
    data = _data(shifts=None, ood={"even": _flipped_digits(200)})
    module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=net, loss="ca")
    assert_spawn_picklable(module, data)
    start = _state(module.calibrator)
    trainer = _ddp_trainer(max_epochs=2)
    trainer.fit(module, data)
    assert _changed(start, module.calibrator)  # the fitted weights came back to this process

    results = trainer.test(module, data, verbose=False)
    ddp = _floats(trainer.callback_metrics)
    assert math.isfinite(ddp["test/id/ece"]) and math.isfinite(ddp["test/even/ece"])
    assert results[0]["test/id/ece"] == pytest.approx(ddp["test/id/ece"])
    assert results[1]["test/even/ece"] == pytest.approx(ddp["test/even/ece"])

    single = quiet_trainer()
    single.test(module, data, verbose=False)
    one = _floats(single.callback_metrics)
    # 200 items split 100 / 100: the synced metrics are the one-process metrics.
    for prefix in ("", "uncal_"):
        for key in KEYS:
            name = f"test/even/{prefix}{key}"
            assert ddp[name] == pytest.approx(one[name], abs=1e-6), name
    # 359 items: DistributedSampler repeats item 0 to give both ranks 180.
    calibrated, uncalibrated, labels = _probs(module, data.test_dataloader()[0])
    assert len(labels) == 359
    for prefix, probs in (("", calibrated), ("uncal_", uncalibrated)):
        padded = _reference(torch.cat([probs, probs[:1]]), torch.cat([labels, labels[:1]]))
        for key, value in padded.items():
            name = f"test/id/{prefix}{key}"
            assert ddp[name] == pytest.approx(value, abs=1e-6), name


def test_ddp_temperature_scaling_takes_the_same_lbfgs_steps_on_every_rank(net):
    # Regression: each rank ran LBFGS's line search on its own loss, so the ranks made different
    # numbers of backward passes (each one an all-reduce under DDP) and deadlocked.
    data = _data(views=False, batch_size=4096, shifts=None)
    module = PostHocCalibration(TemperatureScaling(), 10, classifier=net, loss="ce")
    assert_spawn_picklable(module, data)
    _ddp_trainer(max_epochs=1, limit_val_batches=0).fit(module, data)

    data.setup("fit")
    data.cache_outputs(module.classifier_logits)
    cached = data.cached["train"]
    assert len(cached) % 2 == 0  # no DistributedSampler padding: the same data as one process
    expected = fit_temperature(cached.logits, cached.labels).scalar_temperature().item()
    assert module.calibrator.scalar_temperature().item() == pytest.approx(expected, abs=1e-4)


def test_num_classes_that_does_not_match_the_classifier_fails_before_fitting(net):
    data = _data(views=False, shifts=None)
    calibrator = TemperatureScaling()
    module = PostHocCalibration(calibrator, 7, classifier=net, loss="ce")
    trainer = quiet_trainer(max_epochs=1)
    with pytest.raises(ValueError, match=r"num_classes must match .* gives 10 logits"):
        trainer.fit(module, data)
    assert calibrator.scalar_temperature().item() == pytest.approx(1.5)  # nothing was fitted


def test_corrupt_or_wrong_checkpoint_files_name_the_file(tmp_path, net):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.ckpt is not a readable OPLClassifier checkpoint"):
        PostHocCalibration(TemperatureScaling(), 10, classifier_checkpoint=str(bad))
    with pytest.raises(ValueError, match=r"bad\.ckpt is not a readable checkpoint"):
        PostHocCalibration(TemperatureScaling(), 10, classifier=net, classifier_checkpoint=str(bad))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt must hold a state dict, got list"):
        PostHocCalibration(
            TemperatureScaling(),
            10,
            classifier=net,
            classifier_checkpoint=str(tmp_path / "list.pt"),
        )
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        PostHocCalibration(TemperatureScaling(), 0, classifier=net)


@pytest.mark.parametrize("make", [lambda: HistogramBinning(10), lambda: VectorScaling(10)])
def test_closed_form_calibrators_fit_at_setup_and_test(net, make):
    data = _data(views=False, shifts=None)
    calibrator = make()
    module = PostHocCalibration(calibrator, 10, classifier=ScaledLogits(net, 4.0), loss="ce")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data)
    cached = data.cached["train"]
    expected = make().fit(cached.logits, cached.labels)
    with torch.no_grad():
        torch.testing.assert_close(calibrator(cached.logits), expected(cached.logits))
    logged = _floats(trainer.test(module, data, verbose=False)[0])
    assert logged["test/id/ece"] < logged["test/id/uncal_ece"]


def test_a_classifier_that_outputs_probabilities_is_refused_at_fit(net):
    probabilities = nn.Sequential(net, nn.Softmax(dim=1))
    module = PostHocCalibration(TemperatureScaling(), 10, classifier=probabilities, loss="ce")
    trainer = quiet_trainer(max_epochs=1)
    with pytest.raises(ValueError, match="allow_probabilities=True"):
        trainer.fit(module, _data(views=False, shifts=None))


def test_split_weighting_takes_the_calibration_split_accuracy(net):
    data = _data(shifts=None)
    module = PostHocCalibration(
        CorrectnessAwareCalibrator(3), 10, classifier=ScaledLogits(net, 4.0), weighting="split"
    )
    quiet_trainer(max_epochs=1).fit(module, data)
    cached = data.cached["train"]
    accuracy = (cached.logits.argmax(1) == cached.labels).double().mean().item()
    assert module.split_accuracy == pytest.approx(accuracy, abs=1e-12)
    batch = next(iter(data.train_dataloader()))
    calibrated = module.calibrator(batch["logits"], features=batch["features"])
    got = module._objective(calibrated, batch["labels"]).loss
    want = correctness_aware_loss(calibrated, batch["labels"], "split", accuracy).loss
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="weighting applies to loss='ca' only"):
        PostHocCalibration(TemperatureScaling(), 10, classifier=net, loss="ce", weighting="split")


# ------------------------------------------------------------------------------------------
# The output cache: calibrators of one classifier and data setting share its outputs.


def test_output_cache_gives_the_same_metrics_and_the_second_calibrator_reads_it(
    net, tmp_path, monkeypatch
):
    def data(cache: Path | None) -> CalibrationDataModule:
        folder = None if cache is None else str(cache)
        return CalibrationDataModule(DigitsDataModule(**DIGITS), batch_size=64,
                                     shifts=("rotation",), severities=(3,),
                                     output_cache=folder)  # fmt: skip

    def fit_and_test(loss: str, cache: Path | None) -> dict[str, float]:
        torch.manual_seed(0)
        module = PostHocCalibration(CorrectnessAwareCalibrator(3), 10,
                                    classifier=copy.deepcopy(net), loss=loss)  # fmt: skip
        trainer = quiet_trainer(max_epochs=1)
        dm = data(cache)
        trainer.fit(module, dm)
        trainer.test(module, dm, verbose=False)
        if cache is not None:
            assert dm.cached_test and len(dm.cached_test) == 2  # the test sets were cached
        return _floats(trainer.callback_metrics)

    plain = fit_and_test("ce", None)
    fit_and_test("ca", tmp_path)  # computes and stores the calibration split's and test outputs
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    with monkeypatch.context() as patched:  # the CE calibrator only reads them
        patched.setattr(CalibrationDataModule, "_run", lambda *a: pytest.fail("recomputed"))
        shared = fit_and_test("ce", tmp_path)
    assert shared == plain  # bitwise: the same batches of the same outputs
    assert {k for k in plain if k.startswith("test/")} >= {"test/id/ece", "test/rotation-3/ece"}


def test_outputs_key_follows_the_classifier_and_the_views(net):
    ca = PostHocCalibration(CorrectnessAwareCalibrator(3), 10, classifier=copy.deepcopy(net))
    ts = PostHocCalibration(TemperatureScaling(), 10, classifier=copy.deepcopy(net), loss="ce")
    assert (
        ca.outputs_key()
        == PostHocCalibration(
            CorrectnessAwareCalibrator(3), 10, classifier=copy.deepcopy(net)
        ).outputs_key()
    )
    assert ca.outputs_key() != ts.outputs_key()  # no views' logits without views
    changed = copy.deepcopy(net)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert PostHocCalibration(CorrectnessAwareCalibrator(3), 10,
                              classifier=changed).outputs_key() != ca.outputs_key()  # fmt: skip
