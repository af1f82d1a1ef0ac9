"""FIDCallback and digits-FID: Frechet distance, feature networks, schedule, logging, DDP."""

from __future__ import annotations

import csv
import math
import urllib.error
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.callbacks import FIDCallback, SampleGridCallback
from lightning_losses.datamodules import DigitsDataModule
from lightning_losses.diffusion import EDMPrecond, unet_for_images
from lightning_losses.metrics.digits_fid import (
    DIGITS_FID_FORMAT,
    digits_fid,
    digits_fid_features,
    digits_real_images,
    frechet_distance,
)
from lightning_losses.modules import DMDDistillation
from lightning_losses.nets import SmallCNN
from tests.fakes import DDP_FIND_UNUSED, assert_spawn_picklable
from tests.fakes import QUIET as FAKE_QUIET

REPO = Path(__file__).resolve().parents[2]
QUIET = {**FAKE_QUIET, "limit_val_batches": 0}


# ------------------------------------------------------------------------------------------
# Fakes (module level, so that ddp_spawn could pickle them)


class RealImages(L.LightningDataModule):
    """``num`` random 1x8x8 images in (-1, 1); counts the callers of each loader."""

    def __init__(self, num: int = 32, batch_size: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = scale * torch.tanh(torch.randn(num, 1, 8, 8, generator=g))
        self.labels = torch.arange(num) % 4
        self.batch_size = batch_size
        self.calls = {"train": 0, "val": 0}

    def _loader(self, split: str) -> DataLoader:
        self.calls[split] += 1
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")


class ToyFeatures(nn.Module):
    """A fixed random projection of the pixels: (B, 1, 8, 8) -> (B, 4); records input shapes."""

    def __init__(self, with_num_features: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.register_buffer("weight", torch.randn(64, 4, generator=g) / 8)
        if with_num_features:
            self.num_features = 4
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images: Tensor) -> Tensor:
        self.shapes.append(tuple(images.shape))
        return torch.tanh(images.flatten(1) @ self.weight)


class SameFIDOnEveryRank(L.Callback):
    """Under DDP: every rank recorded the very same FID history."""

    def __init__(self, fid: FIDCallback) -> None:
        self.fid = fid

    def on_train_end(self, trainer, pl_module) -> None:
        values = torch.tensor([v for _, v in self.fid.history], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(values)  # (world, n)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), gathered


class NaNGenerator(L.LightningModule):
    """A module whose samples are NaN."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.full((n, 1, 8, 8), float("nan"))


def tiny_dmd(**kwargs) -> DMDDistillation:
    torch.manual_seed(0)
    teacher = EDMPrecond(unet_for_images(1, 8, (8, 16))).eval()
    return DMDDistillation(teacher=teacher, **kwargs)


def chunked_samples(model, num: int, batch_size: int, seed: int) -> Tensor:
    """The callback's samples, drawn here independently."""
    g = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, num - s) for s in range(0, num, batch_size)]
    return torch.cat([model.sample(n, generator=g) for n in sizes])


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula in float64 with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def direct_toy_fid(model, real: Tensor, num: int, batch_size: int, seed: int) -> float:
    features = ToyFeatures()
    fake = chunked_samples(model, num, batch_size, seed).clamp(-1, 1)
    with torch.no_grad():
        return reference_fid(features(real).double().numpy(), features(fake).double().numpy())


# ------------------------------------------------------------------------------------------
# The Frechet distance


def test_frechet_distance_matches_float64_scipy_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64)
    mix = torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = 0.5 + torch.randn(300, 5, generator=g, dtype=torch.float64) @ mix
    expected = reference_fid(a.numpy(), b.numpy())
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    # translation only changes the mean term: ||delta||^2 exactly
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], b)


# ------------------------------------------------------------------------------------------
# digits-FID


def test_digits_feature_net_is_the_classifier_backbone_on_its_own_inputs():
    net = digits_fid_features()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.num_features == 64
    meta = net.metadata
    assert meta["format"] == DIGITS_FID_FORMAT
    assert meta["config"] == "configs/opl/digits_ce.yaml" and meta["seed"] == "0"
    assert float(meta["test_accuracy"]) > 0.95

    # the classifier's data: the config's DigitsDataModule (default normalize = "standard")
    config = yaml.safe_load((REPO / meta["config"]).read_text())
    args = config["data"]["init_args"]
    classifier_data = DigitsDataModule(**args)
    classifier_data.setup("fit")
    assert classifier_data.normalize == "standard"
    assert float(net.input_mean) == pytest.approx(classifier_data.mean, rel=1e-7)
    assert float(net.input_std) == pytest.approx(classifier_data.std, rel=1e-7)
    symmetric_data = DigitsDataModule(**{**args, "normalize": "symmetric"})
    symmetric_data.setup("fit")

    backbone = SmallCNN(1, 32, 64)
    backbone.load_state_dict(net.backbone.state_dict())
    backbone.eval()
    with torch.no_grad():
        for split in ("train", "val", "test"):
            own = getattr(classifier_data, f"{split}_dataset").tensors[0]
            symmetric = getattr(symmetric_data, f"{split}_dataset").tensors[0]
            assert torch.equal(net.classifier_input(symmetric), own)
            torch.testing.assert_close(net(symmetric), backbone(own), rtol=0, atol=0)

    # digits_real_images() is the symmetric data module's mapping, all 1,797 in sklearn order
    real = digits_real_images()
    assert real.shape == (1797, 1, 8, 8) and real.dtype == torch.float32
    for split in ("train", "val", "test"):
        idx = getattr(symmetric_data, f"{split}_indices")
        assert torch.equal(real[idx], getattr(symmetric_data, f"{split}_dataset").tensors[0])

    # trained, not random: nearest class centre in feature space separates the digits
    from sklearn.datasets import load_digits

    labels = torch.as_tensor(load_digits().target)
    with torch.no_grad():
        features = torch.nn.functional.normalize(net(real).double(), dim=1)
    centres = torch.stack([features[labels == c].mean(0) for c in range(10)])
    accuracy = float(((features @ centres.T).argmax(1) == labels).double().mean())
    assert accuracy > 0.95, accuracy

    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        net(torch.zeros(2, 1, 16, 16))


def test_digits_fid_of_real_digits_is_zero_and_of_noise_is_large():
    real = digits_real_images()
    assert abs(digits_fid(real)) < 1e-6
    g = torch.Generator().manual_seed(0)
    half = digits_fid(real[torch.randperm(1797, generator=g)[:900]])
    noise = digits_fid(torch.rand(2000, 1, 8, 8, generator=g) * 2 - 1)
    assert 0 < half < 1.0
    assert noise > 100 * half, (noise, half)
    # clamping: values beyond [-1, 1] count as the image file would hold them
    stretched = real * 3.0
    assert digits_fid(stretched) == digits_fid(stretched.clamp(-1, 1)) > 10 * half
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        digits_fid(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        digits_fid(torch.full((4, 1, 8, 8), float("nan")))


def test_missing_digits_feature_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_digits_fid_features.py"):
        digits_fid_features(tmp_path / "none.safetensors")


def test_digits_mode_equals_digits_fid():
    model = tiny_dmd(fake_updates_per_generator=1)
    callback = FIDCallback(feature="digits", num_samples=40, batch_size=16, every_n_steps=None)
    assert callback.real_ready  # all digits, at construction
    value = callback.compute(model)
    samples = chunked_samples(model, 40, 16, seed=0)
    assert value == digits_fid(samples, batch_size=16)
    assert value == callback.compute(model)  # same noise, same weights: same number
    assert int(callback.metric.real_features_num_samples) == 1797


# ------------------------------------------------------------------------------------------
# The callback in training


def test_fid_schedule_logging_and_real_statistics_once(tmp_path):
    L.seed_everything(0)
    model = tiny_dmd(fake_updates_per_generator=2, ema_decay=0.5)
    data = RealImages(num=24, batch_size=8)  # 3 batches an epoch
    fid = FIDCallback(feature=ToyFeatures(), num_samples=20, batch_size=8, every_n_steps=2)

    direct: list[float] = []

    class CheckEachEvaluation(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if len(fid.history) > len(direct):
                direct.append(direct_toy_fid(pl_module, data.images, 20, 8, 0))

        def on_train_end(self, trainer, pl_module) -> None:
            direct.append(direct_toy_fid(pl_module, data.images, 20, 8, 0))

    options = {**QUIET, "logger": CSVLogger(tmp_path, name="run"), "log_every_n_steps": 50}
    trainer = L.Trainer(**options, max_epochs=2, callbacks=[fid, CheckEachEvaluation()])
    trainer.fit(model, data)

    # 6 training steps, generator_steps after each: 0 1 1 2 2 3; step 2 is evaluated ONCE
    assert int(model.generator_steps) == 3
    assert [step for step, _ in fid.history] == [2, 3]
    values = [value for _, value in fid.history]
    assert all(math.isfinite(v) and v > 0 for v in values)
    np.testing.assert_allclose(values, direct, rtol=1e-6)
    assert float(trainer.callback_metrics["fid"]) == pytest.approx(values[-1], rel=1e-6)
    # both values reached the logger, the on_train_end one included
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        logged = [float(row["fid"]) for row in csv.DictReader(handle) if row.get("fid")]
    np.testing.assert_allclose(logged, values, rtol=1e-12)
    # real statistics: one extra train loader (the trainer's own + the callback's), all images
    assert data.calls["train"] == 2
    assert int(fid.metric.real_features_num_samples) == 24


def test_real_split_cap_and_inferred_num_features():
    model = tiny_dmd(fake_updates_per_generator=1)
    data = RealImages(num=40, batch_size=16)
    features = ToyFeatures(with_num_features=False)
    fid = FIDCallback(feature=features, num_samples=12, batch_size=5, real="val", max_real=20)
    assert fid.metric is None  # F unknown until a real batch goes through
    value = fid.compute(model, data)
    assert data.calls == {"train": 0, "val": 1}
    assert int(fid.metric.real_features_num_samples) == 20
    # never probed with a 299x299 dummy: only real / generated 8x8 batches
    assert all(shape[1:] == (1, 8, 8) for shape in features.shapes)
    assert value == pytest.approx(
        reference_fid(
            ToyFeatures()(data.images[:20]).double().numpy(),
            ToyFeatures()(chunked_samples(model, 12, 5, 0).clamp(-1, 1)).double().numpy(),
        ),
        rel=1e-6,
    )
    fid.compute(model, data)
    assert data.calls["val"] == 1  # kept


def test_non_finite_samples_give_nan_and_restore_the_mode():
    module = NaNGenerator().train()
    fid = FIDCallback(feature=ToyFeatures(), num_samples=8, batch_size=4)
    with pytest.warns(UserWarning, match="non-finite"):
        assert math.isnan(fid.compute(module, RealImages()))
    assert module.training
    assert int(fid.metric.fake_features_num_samples) == 0


def test_bad_real_data_and_modules_raise():
    model = tiny_dmd(fake_updates_per_generator=1)
    fid = FIDCallback(feature=ToyFeatures(), num_samples=4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid.compute(model, RealImages(scale=3.0))
    with pytest.raises(ValueError, match="val_dataloader"):
        FIDCallback(feature=ToyFeatures(), real="val").compute(model, None)
    with pytest.raises(TypeError, match="sample"):
        FIDCallback(feature=ToyFeatures()).compute(nn.Linear(2, 2), RealImages())
    with pytest.raises(ValueError, match="one of"):
        FIDCallback(feature=100)
    with pytest.raises(ValueError, match="feature must be"):
        FIDCallback(feature=3.5)
    with pytest.raises(ValueError, match="real must be"):
        FIDCallback(feature=ToyFeatures(), real="everything")
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(feature=ToyFeatures(), num_samples=1)
    with pytest.raises(ValueError, match="every_n_steps"):
        FIDCallback(feature=ToyFeatures(), every_n_steps=0)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        FIDCallback(feature="digits", num_samples=4).compute(
            DMDDistillation(teacher=EDMPrecond(unet_for_images(3, 8, (8, 16))))
        )


# ------------------------------------------------------------------------------------------
# Inception


def test_default_inception_offline_raises_a_clear_error(monkeypatch, tmp_path):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r'feature="/path/to/.*\.pth".*nn\.Module') as info:
        FIDCallback()
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    with pytest.raises(RuntimeError, match="feature=768"):
        FIDCallback(feature=768)


def test_local_inception_weights_path(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=r"feature='.*nowhere\.pth'"):
        FIDCallback(feature=str(missing))
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a state dict")
    with pytest.raises(ValueError, match="not a plain state dict"):
        FIDCallback(feature=str(not_weights))

    # a random-weight Inception in the real file format (the true weights need the network)
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    # 75x75, Inception's smallest input, instead of 299x299: 16 times fewer FLOPs on the CPU
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
        random_inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception.pth"
    torch.save(random_inception.state_dict(), weights)

    fid = FIDCallback(feature=str(weights), num_samples=3, batch_size=3, max_real=3)
    assert fid.metric.inception.num_features == 2048
    # the features: grey [-1, 1] -> uint8 RGB -> torch-fidelity's own (TF-compatible) Inception
    # with the file's weights (the distance itself is the same code as every other mode's, and
    # a 2048-d eigendecomposition costs seconds on the CPU)
    random_inception.load_state_dict(torch.load(weights, weights_only=True))
    images = torch.linspace(-1.2, 1.2, 2 * 64).reshape(2, 1, 8, 8)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    assert pixels.min() == 0 and pixels.max() == 255
    with torch.no_grad():
        expected = random_inception(pixels)[0].double()
        torch.testing.assert_close(fid.metric.inception(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1 or 3"):
        fid.metric.inception(torch.zeros(2, 2, 8, 8))


# ------------------------------------------------------------------------------------------
# DDP


def test_ddp_two_processes_report_the_one_process_value(tmp_path):
    L.seed_everything(0)
    model = tiny_dmd(fake_updates_per_generator=2)
    data = RealImages(num=32, batch_size=4)  # 4 steps on each rank
    fid = FIDCallback(feature=ToyFeatures(), num_samples=20, batch_size=8, every_n_steps=1)
    # SampleGridCallback's DDP check rides along: rank 0 writes each grid once
    grids = SampleGridCallback(num_samples=4, every_n_steps=1, dirpath=str(tmp_path / "grids"))
    trainer = L.Trainer(
        **{**QUIET, "devices": 2},
        strategy=DDP_FIND_UNUSED,
        max_epochs=1,
        callbacks=[fid, SameFIDOnEveryRank(fid), grids],
    )
    assert_spawn_picklable(model, data, fid, grids)
    trainer.fit(model, data)
    assert int(model.generator_steps) == 2
    # the parent has rank 0's weights and metrics back: one process, the same samples
    one_process = FIDCallback(feature=ToyFeatures(), num_samples=20, batch_size=8)
    expected = one_process.compute(model, data)
    assert float(trainer.callback_metrics["fid"]) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(direct_toy_fid(model, data.images, 20, 8, 0), rel=1e-6)

    written = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert written == ["step_000001.png", "step_000002.png"]
    reference = SampleGridCallback(num_samples=4).save(model, 2, tmp_path / "one")
    assert reference.read_bytes() == (tmp_path / "grids" / "step_000002.png").read_bytes()
