"""Denoisers in EDM sigma space, the Karras schedule, the Heun sampler and the EDM loss."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lightning_losses.diffusion import (
    Denoiser,
    DiffusersEpsDenoiser,
    EDMPrecond,
    edm_heun_sampler,
    edm_loss,
    heun_step,
    karras_sigmas,
    per_sample_sigma,
    unet_for_images,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")


# --------------------------------------------------------------------------- helpers


def tiny_unet(num_classes: int | None = None, **overrides) -> nn.Module:
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=False,
        num_class_embeds=num_classes,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**config).eval()


class StubUNet(nn.Module):
    """F(sample, t) = 3 * sample + t / 100 (+ label / 10): a known function of every input."""

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, **config) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            sample_size=8,
            time_embedding_type="positional",
            center_input_sample=False,
            class_embed_type=None,
            num_class_embeds=None,
        )
        for key, value in config.items():
            setattr(self.config, key, value)
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls.append((sample, timestep, class_labels))
        out = 3 * sample + timestep.view(-1, 1, 1, 1) / 100
        if class_labels is not None:
            out = out + class_labels.view(-1, 1, 1, 1) / 10
        if self.config.out_channels != self.config.in_channels:
            out = torch.cat([out, torch.full_like(out, 1e6)], dim=1)
        return (out,)


class ConstantDenoiser(Denoiser):
    """D(x; sigma) = x0 for every input: the ODE solution is x0 + (sigma / sigma_a)(x_a - x0)."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__(sigma_min=0.002, sigma_max=80.0, in_channels=x0.shape[1], sample_size=8)
        self.x0 = x0
        self.sigmas: list[Tensor] = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(per_sample_sigma(sigma, x))
        return self.x0.to(x.dtype).expand_as(x)


class GaussianDenoiser(Denoiser):
    """The exact denoiser of N(0, sd^2) data: D = x sd^2 / (sigma^2 + sd^2).

    Its ODE solution is x(sigma) = x_a sqrt((sigma^2 + sd^2) / (sigma_a^2 + sd^2)).
    """

    def __init__(self, sd: float = 0.5) -> None:
        super().__init__(sigma_min=0.002, sigma_max=80.0, in_channels=1, sample_size=8)
        self.sd = sd
        self.calls = 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        s = per_sample_sigma(sigma, x, x.dtype).view(-1, 1, 1, 1)
        return x * self.sd**2 / (s**2 + self.sd**2)

    def exact(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        return x * math.sqrt((sigma_to**2 + self.sd**2) / (sigma_from**2 + self.sd**2))


def scheduler_sigmas(scheduler) -> Tensor:
    abar = scheduler.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


# --------------------------------------------------------------------------- per_sample_sigma


def test_per_sample_sigma_accepts_documented_forms_and_rejects_others():
    x = torch.zeros(3, 1, 2, 2)
    expected = torch.tensor([0.5, 0.5, 0.5])
    assert torch.equal(per_sample_sigma(0.5, x), expected)
    assert torch.equal(per_sample_sigma(torch.tensor(0.5), x), expected)
    assert torch.equal(per_sample_sigma(torch.tensor([0.5]), x), expected)
    values = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(per_sample_sigma(values, x), values)
    assert torch.equal(per_sample_sigma(values.view(3, 1, 1, 1), x), values)
    assert per_sample_sigma(0.5, x, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="sigma"):
        per_sample_sigma(torch.ones(2), x)
    with pytest.raises(ValueError, match="sigma"):
        per_sample_sigma(torch.ones(3, 2), x)
    with pytest.raises(ValueError, match="sigma"):
        per_sample_sigma("0.5", x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- EDMPrecond


def edm_reference(x: Tensor, sigma: Tensor, sd: float, f) -> Tensor:
    s = sigma.view(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    c_noise = torch.log(sigma) / 4
    return c_skip * x + c_out * f(c_in * x, c_noise)


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_edm_precond_matches_formulas_with_a_stub(sd):
    stub = StubUNet()
    denoiser = EDMPrecond(stub, sigma_data=sd)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
    out = denoiser(x, sigma)
    expected = edm_reference(x, sigma, sd, lambda a, t: 3 * a + t.view(-1, 1, 1, 1) / 100)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    # The UNet receives c_noise = ln(sigma) / 4 as a float32 timestep: fractional and negative.
    timestep = stub.calls[-1][1]
    assert timestep.dtype == torch.float32
    torch.testing.assert_close(timestep, (sigma.log() / 4).float())
    assert timestep[0] < 0


def test_edm_precond_scalar_sigma_forms_agree():
    denoiser = EDMPrecond(StubUNet())
    x = torch.randn(3, 1, 8, 8)
    reference = denoiser(x, torch.full((3,), 0.7))
    torch.testing.assert_close(denoiser(x, 0.7), reference)
    torch.testing.assert_close(denoiser(x, torch.tensor(0.7)), reference)
    torch.testing.assert_close(denoiser(x, torch.full((3, 1, 1, 1), 0.7)), reference)
    with pytest.raises(ValueError, match="sigma"):
        denoiser(x, 0.0)


@pytest.mark.parametrize(
    "sigma",
    [
        torch.zeros(3),
        torch.tensor([0.5, -0.1, 0.5]),
        torch.tensor(float("inf")),
        torch.tensor([0.5, float("nan"), 0.5]),
        float("inf"),
        float("nan"),
        -1.0,
    ],
    ids=["zeros", "negative", "inf_tensor", "nan_tensor", "inf", "nan", "negative_float"],
)
def test_edm_precond_refuses_tensor_and_float_sigmas_that_are_not_positive_and_finite(sigma):
    denoiser = EDMPrecond(StubUNet())
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        denoiser(torch.randn(3, 1, 8, 8), sigma)


def test_trusted_sigmas_skips_the_tensor_check_and_nothing_else(monkeypatch):
    from lightning_losses.diffusion import trusted_sigmas

    denoiser = EDMPrecond(StubUNet())
    x = torch.randn(3, 1, 8, 8)
    reads = []
    original = Tensor.__bool__
    monkeypatch.setattr(Tensor, "__bool__", lambda t: reads.append(1) or original(t))
    denoiser(x, torch.full((3,), 0.7))
    assert len(reads) == 1  # one host read for the check
    reads.clear()
    with trusted_sigmas():
        out = denoiser(x, torch.full((3,), 0.7))
        assert reads == []
        with pytest.raises(ValueError, match="sigma"):
            denoiser(x, 0.0)  # a Python float is still checked (free)
    torch.testing.assert_close(out, denoiser(x, 0.7))


def test_edm_precond_with_a_real_unet_recomputes_by_hand():
    unet = tiny_unet()
    denoiser = EDMPrecond(unet)
    assert (denoiser.in_channels, denoiser.sample_size, denoiser.num_classes) == (1, 8, None)
    assert (denoiser.sigma_min, denoiser.sigma_max) == (0.002, 80.0)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 40.0])
    with torch.no_grad():
        out = denoiser(x, sigma)
        expected = edm_reference(
            x, sigma, 0.5, lambda a, t: unet(a, t.reshape(-1), return_dict=False)[0]
        )
        # Fractional noise labels matter: a slightly different sigma changes the output.
        shifted = denoiser(x, sigma * 1.01)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, shifted)


def test_edm_precond_float64_input_gives_float64_output():
    denoiser = EDMPrecond(tiny_unet())
    with torch.no_grad():
        out = denoiser(torch.randn(2, 1, 8, 8, dtype=torch.float64), 1.0)
    assert out.dtype == torch.float64


def test_edm_precond_class_conditional():
    unet = tiny_unet(num_classes=3)
    denoiser = EDMPrecond(unet)
    assert denoiser.num_classes == 3
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = denoiser(x, 1.0, labels)
        expected = edm_reference(
            x,
            torch.ones(2),
            0.5,
            lambda a, t: unet(a, t.reshape(-1), class_labels=labels, return_dict=False)[0],
        )
        other = denoiser(x, 1.0, torch.tensor([1, 1]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser(x, 1.0)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser(x, 1.0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="class_labels"):
        EDMPrecond(tiny_unet())(x, 1.0, labels)


def test_edm_precond_input_checks():
    denoiser = EDMPrecond(StubUNet())
    with pytest.raises(ValueError, match="channels"):
        denoiser(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="x must be"):
        denoiser(torch.randn(2, 8, 8), 1.0)
    with pytest.raises(ValueError, match="out_channels"):
        EDMPrecond(StubUNet(out_channels=2))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(StubUNet(), sigma_data=0.0)
    with pytest.raises(ValueError, match="center_input_sample"):
        EDMPrecond(StubUNet(center_input_sample=True))


@pytest.mark.parametrize("wrapper", ["edm", "ddpm"])
def test_learned_and_fourier_time_embeddings_are_refused(wrapper):
    def build(unet):
        if wrapper == "edm":
            return EDMPrecond(unet)
        return DiffusersEpsDenoiser(unet, diffusers.DDPMScheduler())

    with pytest.raises(ValueError, match="learned"):
        build(tiny_unet(time_embedding_type="learned", num_train_timesteps=1000))
    with pytest.raises(ValueError, match="fourier"):
        build(StubUNet(time_embedding_type="fourier"))


def test_check_compatible():
    a = EDMPrecond(StubUNet())
    a.check_compatible(EDMPrecond(StubUNet()))
    with pytest.raises(ValueError, match="in_channels"):
        a.check_compatible(EDMPrecond(StubUNet(in_channels=3)), "teacher")
    with pytest.raises(ValueError, match="num_classes"):
        a.check_compatible(EDMPrecond(StubUNet(num_class_embeds=10)))
    with pytest.raises(ValueError, match="sample_size"):
        a.check_compatible(EDMPrecond(StubUNet(sample_size=(8, 16))))


# --------------------------------------------------------------------------- DiffusersEpsDenoiser


def test_ddpm_sigma_range_of_default_linear_betas():
    denoiser = DiffusersEpsDenoiser(StubUNet(), diffusers.DDPMScheduler())
    assert denoiser.sigma_min == pytest.approx(0.0100, abs=5e-5)
    assert denoiser.sigma_max == pytest.approx(157.4, abs=0.05)
    table = denoiser.sigma_table
    assert table.shape == (1000,) and bool((table[1:] > table[:-1]).all())


def test_ddpm_on_grid_equals_hand_formula():
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler()
    denoiser = DiffusersEpsDenoiser(unet, scheduler)
    table = scheduler_sigmas(scheduler)
    x = torch.randn(4, 1, 8, 8)
    steps = [0, 17, 500, 999]
    sigma = table[steps]  # float64, exactly on the grid
    assert torch.equal(denoiser.timestep(sigma), torch.tensor(steps, dtype=torch.float64))
    with torch.no_grad():
        out = denoiser(x, sigma)
        s = sigma.float().view(-1, 1, 1, 1)
        eps = unet(x / torch.sqrt(1 + s**2), torch.tensor(steps), return_dict=False)[0]
    torch.testing.assert_close(out, x - s * eps, rtol=1e-5, atol=1e-4)
    # One Python float on the grid, broadcast over the batch.
    with torch.no_grad():
        single = denoiser(x, float(table[250]))
        s = float(table[250])
        eps = unet(x / math.sqrt(1 + s**2), torch.full((4,), 250), return_dict=False)[0]
    torch.testing.assert_close(single, x - s * eps, rtol=1e-5, atol=1e-5)


def test_ddpm_fractional_timestep_between_grid_points():
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler()
    denoiser = DiffusersEpsDenoiser(unet, scheduler)
    log_table = scheduler_sigmas(scheduler).log()
    # A quarter of the way from t = 300 to t = 301 in log sigma gives t = 300.25.
    log_sigma = log_table[300] + 0.25 * (log_table[301] - log_table[300])
    sigma = log_sigma.exp()
    torch.testing.assert_close(
        denoiser.timestep(sigma.view(1)), torch.tensor([300.25], dtype=torch.float64)
    )
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = denoiser(x, sigma)
        s = float(sigma)
        eps = unet(x / math.sqrt(1 + s**2), torch.full((2,), 300.25), return_dict=False)[0]
        eps_grid = unet(x / math.sqrt(1 + s**2), torch.full((2,), 300), return_dict=False)[0]
    torch.testing.assert_close(out, x - s * eps, rtol=1e-5, atol=1e-5)
    # The UNet really saw the fractional timestep, not a truncated one.
    assert not torch.allclose(out, x - s * eps_grid, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_prediction_types_match_formulas(prediction_type):
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type)
    stub = StubUNet()
    denoiser = DiffusersEpsDenoiser(stub, scheduler)
    assert denoiser.prediction_type == prediction_type
    steps = [3, 400, 998]
    abar = scheduler.alphas_cumprod.double()[steps].view(-1, 1, 1, 1)
    sigma = scheduler_sigmas(scheduler)[steps]
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    out = denoiser(x, sigma)
    # Independent of the wrapper's sigma algebra: the VP input is sqrt(abar_t) * x.
    x_vp = abar.sqrt() * x
    model = 3 * x_vp + torch.tensor(steps, dtype=torch.float64).view(-1, 1, 1, 1) / 100
    if prediction_type == "epsilon":
        expected = x - sigma.view(-1, 1, 1, 1) * model
    elif prediction_type == "v_prediction":
        expected = abar.sqrt() * x_vp - (1 - abar).sqrt() * model
    else:
        expected = model
    # The timestep reaches the UNet as float32 (t / 100 carries ~1e-7 relative error).
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_ddpm_prediction_type_override_and_bad_value():
    scheduler = diffusers.DDPMScheduler()
    assert DiffusersEpsDenoiser(StubUNet(), scheduler, "sample").prediction_type == "sample"
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersEpsDenoiser(StubUNet(), scheduler, "x0")


def test_ddpm_sigma_is_clamped_to_the_table():
    stub = StubUNet()
    denoiser = DiffusersEpsDenoiser(stub, diffusers.DDPMScheduler())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    low = torch.tensor([1e-4, 0.0], dtype=torch.float64)
    high = torch.tensor([1e3, 1e6], dtype=torch.float64)
    torch.testing.assert_close(denoiser(x, low), denoiser(x, denoiser.sigma_min))
    torch.testing.assert_close(denoiser(x, high), denoiser(x, denoiser.sigma_max))
    assert torch.equal(denoiser.timestep(low), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(denoiser.timestep(high), torch.full((2,), 999.0, dtype=torch.float64))
    # Inside the range nothing is clamped.
    inside = denoiser(x, 80.0)
    assert not torch.allclose(inside, denoiser(x, denoiser.sigma_max))


def test_ddpm_learned_variance_output_uses_the_first_channels():
    denoiser = DiffusersEpsDenoiser(StubUNet(out_channels=2), diffusers.DDPMScheduler())
    reference = DiffusersEpsDenoiser(StubUNet(), diffusers.DDPMScheduler())
    x = torch.randn(2, 1, 8, 8)
    out = denoiser(x, 1.0)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference(x, 1.0))


def test_ddpm_rejects_bad_schedulers():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusersEpsDenoiser(StubUNet(), object())
    zero_snr = diffusers.DDPMScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusersEpsDenoiser(StubUNet(), zero_snr)


def test_ddpm_class_conditional_passes_labels():
    stub = StubUNet(num_class_embeds=4)
    denoiser = DiffusersEpsDenoiser(stub, diffusers.DDPMScheduler(), "sample")
    x = torch.zeros(2, 1, 8, 8)
    labels = torch.tensor([1, 3])
    denoiser(x, 1.0, labels)
    assert torch.equal(stub.calls[-1][2], labels)
    with pytest.raises(ValueError, match="class_labels"):
        denoiser(x, 1.0)


def test_from_pretrained_round_trip_pipeline_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler(prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = DiffusersEpsDenoiser.from_pretrained(tmp_path / "pipe")
    original = DiffusersEpsDenoiser(unet, scheduler)
    assert loaded.prediction_type == "v_prediction"
    assert not loaded.training
    assert loaded.sigma_min == original.sigma_min and loaded.sigma_max == original.sigma_max
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.05, 12.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma), original(x, sigma))
    # The same folder found through `subfolder`.
    nested = DiffusersEpsDenoiser.from_pretrained(tmp_path, subfolder="pipe")
    with torch.no_grad():
        torch.testing.assert_close(nested(x, sigma), original(x, sigma))


def test_from_pretrained_flat_pair_keeps_scheduler_class(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = tiny_unet()
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    unet.save_pretrained(tmp_path)
    scheduler.save_pretrained(tmp_path)
    loaded = DiffusersEpsDenoiser.from_pretrained(str(tmp_path))
    assert isinstance(loaded.scheduler, diffusers.DDIMScheduler)
    original = DiffusersEpsDenoiser(unet, scheduler)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3.0), original(x, 3.0))


def test_from_pretrained_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local"):
        DiffusersEpsDenoiser.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        DiffusersEpsDenoiser.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- karras_sigmas


def test_karras_sigmas():
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (18,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == 80.0 and sigmas[-1].item() == 0.002
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    i, n, rho = 5, 18, 7.0
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    custom = karras_sigmas(1000, 0.01, 157.4, rho=3.0, dtype=torch.float32)
    assert custom.dtype == torch.float32 and custom.shape == (1000,)
    assert custom[0] == torch.tensor(157.4) and custom[-1] == torch.tensor(0.01)
    assert bool((custom[1:] < custom[:-1]).all())
    two = karras_sigmas(2, 0.5, 2.0)
    assert two.tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="n must"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, 80.0, 0.002)
    with pytest.raises(ValueError, match="rho"):
        karras_sigmas(10, rho=0.0)


# --------------------------------------------------------------------------- Heun step and sampler


def test_heun_step_is_exact_for_a_constant_denoiser():
    x0 = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 5
    denoiser = ConstantDenoiser(x0)
    out = heun_step(denoiser, x, 5.0, 2.0)
    torch.testing.assert_close(out, x0 + (2.0 / 5.0) * (x - x0), rtol=0, atol=1e-12)
    assert len(denoiser.sigmas) == 2  # second order: two evaluations
    # Per-sample levels, one of them stepping to 0 (Euler, lands on x0).
    s_from = torch.tensor([5.0, 1.0, 0.3], dtype=torch.float64)
    s_to = torch.tensor([2.0, 0.0, 0.1], dtype=torch.float64)
    out = heun_step(denoiser, x, s_from, s_to)
    expected = x0 + (s_to / s_from).view(-1, 1, 1, 1) * (x - x0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    denoiser.sigmas.clear()
    torch.testing.assert_close(heun_step(denoiser, x, 0.5, 0.0), x0, rtol=0, atol=1e-12)
    assert len(denoiser.sigmas) == 1  # the step to 0 evaluates once


def test_heun_step_matches_algorithm_and_is_second_order():
    denoiser = GaussianDenoiser()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    a, b = 2.0, 1.2
    d_a = (x - denoiser(x, a)) / a
    x_e = x + (b - a) * d_a
    d_b = (x_e - denoiser(x_e, b)) / b
    torch.testing.assert_close(heun_step(denoiser, x, a, b), x + (b - a) * 0.5 * (d_a + d_b))
    # Local error O(h^3): halving the step divides it by about 8 (Euler would give 4).
    errors = []
    for h in (0.1, 0.05):
        exact = denoiser.exact(x, 1.0, 1.0 - h)
        errors.append((heun_step(denoiser, x, 1.0, 1.0 - h) - exact).abs().max().item())
    assert 6.0 < errors[0] / errors[1] < 11.0


def test_sampler_with_constant_denoiser_returns_x0():
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    denoiser = ConstantDenoiser(x0)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = edm_heun_sampler(denoiser, noise, num_steps=5)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    # 5 levels, a final 0 appended: 4 Heun steps (2 evaluations) and one Euler step (1).
    assert len(denoiser.sigmas) == 9
    assert denoiser.sigmas[0][0].item() == pytest.approx(80.0)
    assert denoiser.sigmas[-1][0].item() == pytest.approx(0.002)


def test_sampler_follows_the_ode_of_a_gaussian_denoiser():
    denoiser = GaussianDenoiser()
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    exact = denoiser.exact(noise * 80.0, 80.0, 0.0)
    scale = exact.abs().max().item()
    errors = [
        (edm_heun_sampler(denoiser, noise, num_steps=n) - exact).abs().max().item() / scale
        for n in (18, 36, 72)
    ]
    # Global second order: doubling the steps divides the error by about 4.
    assert 3.0 < errors[0] / errors[1] < 6.0 and 3.0 < errors[1] / errors[2] < 6.0
    assert errors[0] < 0.1 and errors[2] < 5e-3
    assert denoiser.calls == sum(2 * n - 1 for n in (18, 36, 72))


def test_sampler_sigmas_default_to_the_teachers_range_and_validate():
    teacher = DiffusersEpsDenoiser(StubUNet(), diffusers.DDPMScheduler(), "sample")
    seen: list[float] = []

    class Recorder(nn.Module):
        sigma_min, sigma_max = teacher.sigma_min, teacher.sigma_max

        def forward(self, x, sigma, class_labels=None):
            seen.append(per_sample_sigma(sigma, x)[0].item())
            return teacher(x, sigma)

    edm_heun_sampler(Recorder(), torch.randn(1, 1, 8, 8), num_steps=4)
    assert seen[0] == pytest.approx(80.0) and seen[-1] == pytest.approx(teacher.sigma_min)
    seen.clear()
    edm_heun_sampler(Recorder(), torch.randn(1, 1, 8, 8), sigmas=torch.tensor([3.0, 1.0, 0.0]))
    assert seen == pytest.approx([3.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sigmas"):
        edm_heun_sampler(Recorder(), torch.randn(1, 1, 8, 8), sigmas=torch.tensor([1.0, 3.0]))


# --------------------------------------------------------------------------- EDM loss


def test_edm_loss_matches_formula():
    stub_denoiser = EDMPrecond(StubUNet())
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = edm_loss(stub_denoiser, x, generator=torch.Generator().manual_seed(3))
    # Same draws in the same order: ln sigma for each sample, then the noise.
    g = torch.Generator().manual_seed(3)
    sigma = (-1.2 + 1.2 * torch.randn(4, generator=g)).exp()
    noise = torch.randn(x.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    weight = (s**2 + 0.25) / (s * 0.5) ** 2
    expected = (weight * (stub_denoiser(x + s * noise, sigma) - x) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_edm_loss_decreases_with_adam_on_a_fixed_batch():
    torch.manual_seed(0)
    denoiser = EDMPrecond(unet_for_images(1, 8, channels=(16, 32), num_classes=2))
    # Two learnable 'digits': a bright left half or a bright top half, chosen by the label.
    labels = torch.arange(16) % 2
    x = -torch.ones(16, 1, 8, 8)
    x[labels == 0, :, :, :4] = 1.0
    x[labels == 1, :, :4, :] = 1.0
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)

    def evaluate() -> float:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(123)
            return edm_loss(denoiser, x, labels, generator=gen).item()

    before = evaluate()
    assert math.isfinite(before) and before > 0
    for step in range(25):
        loss = edm_loss(denoiser, x, labels, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert math.isfinite(after) and 0 < after < 0.8 * before


# --------------------------------------------------------------------------- unet_for_images


def test_unet_for_images_builds_valid_small_unets():
    unet = unet_for_images(1, 8)
    assert unet.config.time_embedding_type == "positional"
    assert unet.config.out_channels == 1 and unet.config.num_class_embeds is None
    with torch.no_grad():
        out = EDMPrecond(unet)(torch.randn(2, 1, 8, 8), torch.tensor([0.01, 50.0]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    attn = unet_for_images(3, 16, channels=(8, 16, 24), num_classes=10, attention=True)
    assert "AttnDownBlock2D" in attn.config.down_block_types
    with torch.no_grad():
        out = EDMPrecond(attn)(torch.randn(2, 3, 16, 16), 1.0, torch.tensor([0, 9]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sample_size"):
        unet_for_images(1, 6, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="channels"):
        unet_for_images(1, 8, channels=())
