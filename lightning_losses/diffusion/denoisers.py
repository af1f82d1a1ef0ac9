"""Denoisers in EDM sigma space (Karras et al., 2022).

Every denoiser here is an :class:`torch.nn.Module` called as ``D(x, sigma, class_labels=None)``
that returns an estimate of the clean image :math:`x_0` from a noisy image

.. math::

    x = x_0 + \\sigma \\epsilon, \\qquad \\epsilon \\sim \\mathcal{N}(0, I),

with :math:`x_0` scaled to [-1, 1]. The score of the noisy distribution follows as
:math:`\\nabla_x \\log p_\\sigma(x) \\approx (D(x; \\sigma) - x) / \\sigma^2`.

``sigma`` may be a Python float, a 0-d tensor, a one-element tensor, a ``(B,)`` tensor or a
``(B, 1, ..., 1)`` tensor: one noise level per sample, broadcast over the batch when it is a single
value (:func:`per_sample_sigma`). ``class_labels`` are integer class indices of shape ``(B,)``,
required when the denoiser is class conditional (``num_classes`` is not None) and refused
otherwise.

diffusers is never imported by this module: the wrappers take an already built ``UNet2DModel``
(or any module with the same call signature and ``config``), and
:meth:`DiffusersEpsDenoiser.from_pretrained` imports diffusers when it is called.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def per_sample_sigma(sigma: float | Tensor, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """One noise level per sample of ``x``, as a ``(B,)`` tensor on ``x.device``.

    Args:
        sigma: a Python number, a tensor with a single element (0-d, ``(1,)``, ...), a ``(B,)``
            tensor, or a ``(B, 1, ..., 1)`` tensor, where ``B = x.shape[0]``.
        x: the batch the noise levels belong to.
        dtype: the dtype of the result; ``x``'s dtype promoted to at least float32 by default.

    Raises:
        ValueError: when ``sigma`` cannot be read as one value per sample.
    """
    if x.ndim < 1:
        raise ValueError(f"x must have a batch dimension, got a {x.ndim}-d tensor")
    batch = x.shape[0]
    if dtype is None:
        dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
        raise ValueError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if not isinstance(sigma, Tensor):
        return torch.full((batch,), float(sigma), dtype=dtype, device=x.device)
    sigma = sigma.to(device=x.device, dtype=dtype)
    if sigma.numel() == 1:
        return sigma.reshape(1).expand(batch)
    if sigma.ndim >= 1 and sigma.shape[0] == batch and sigma.numel() == batch:
        return sigma.reshape(batch)
    raise ValueError(
        f"sigma must be a float, a single-element tensor, or a (B,) / (B, 1, ..., 1) tensor with "
        f"B = {batch} (the batch size of x), got shape {tuple(sigma.shape)}"
    )


def _config_value(module: nn.Module, key: str, default: Any = None) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            f"unet must be a diffusers UNet2DModel (or a module with a `config`), got "
            f"{type(module).__name__} without a `config` attribute"
        )
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _sample_size(value: Any) -> int | tuple[int, int] | None:
    if value is None or isinstance(value, int):
        return value
    height, width = (int(v) for v in value)
    return height if height == width else (height, width)


def _check_unet(unet: nn.Module, owner: str) -> None:
    """Refuse UNet configurations that cannot take EDM-style fractional noise labels."""
    if not isinstance(unet, nn.Module):
        raise ValueError(f"unet must be an nn.Module (a diffusers UNet2DModel), got {type(unet)}")
    embedding = _config_value(unet, "time_embedding_type", "positional")
    if embedding == "learned":
        raise ValueError(
            f"{owner} needs fractional (and for EDMPrecond negative) timesteps, but this UNet's "
            "time_embedding_type is 'learned': an nn.Embedding lookup that only accepts integer "
            "timesteps in [0, num_train_timesteps). Use a UNet with time_embedding_type="
            "'positional'."
        )
    if embedding != "positional":
        raise ValueError(
            f"{owner} supports time_embedding_type='positional' only, got {embedding!r} (the "
            "'fourier' embedding takes log(timestep) and divides the UNet's output by it)"
        )
    if _config_value(unet, "center_input_sample", False):
        raise ValueError(
            f"{owner}: the UNet has center_input_sample=True (it maps [0, 1] inputs to [-1, 1]); "
            "denoisers here work on data already scaled to [-1, 1], so build it with "
            "center_input_sample=False"
        )
    class_embed_type = _config_value(unet, "class_embed_type", None)
    if class_embed_type is not None:
        raise ValueError(
            f"{owner} supports class conditioning through num_class_embeds only, got "
            f"class_embed_type={class_embed_type!r}"
        )


def _module_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for parameter in module.parameters():
        return parameter.dtype
    return fallback


class Denoiser(nn.Module):
    """Base class of every denoiser: ``D(x, sigma, class_labels=None) -> x0 estimate``.

    Subclasses implement :meth:`forward` and set the attributes below, which later modules use to
    check that a generator, a teacher and a data set fit together.

    Attributes:
        sigma_min: the smallest noise level the denoiser is meant for.
        sigma_max: the largest noise level the denoiser is meant for.
        in_channels: the number of image channels.
        sample_size: the training resolution, an int (square) or ``(height, width)``; None when
            unknown.
        num_classes: the number of classes of a class-conditional denoiser, None when
            unconditional.
    """

    def __init__(
        self,
        *,
        sigma_min: float,
        sigma_max: float,
        in_channels: int,
        sample_size: int | tuple[int, int] | None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.in_channels = int(in_channels)
        self.sample_size = _sample_size(sample_size)
        self.num_classes = num_classes

    def forward(
        self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """Estimate the clean image of ``x = x0 + sigma * eps``."""
        raise NotImplementedError

    def check_inputs(self, x: Tensor, class_labels: Tensor | None = None) -> None:
        """Raise ValueError when ``x`` or ``class_labels`` do not fit this denoiser.

        ``x`` must be ``(B, in_channels, H, W)``; ``class_labels`` an integer ``(B,)`` tensor
        when ``num_classes`` is set and None otherwise. The spatial size is not checked (a UNet
        runs at other resolutions); use :meth:`check_compatible` for that.
        """
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the denoiser takes {self.in_channels}"
            )
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given but the denoiser is unconditional (num_classes=None)"
                )
            return
        if class_labels is None:
            raise ValueError(
                f"the denoiser is class conditional ({self.num_classes} classes): pass "
                "class_labels, an integer tensor of shape (B,)"
            )
        if (
            not isinstance(class_labels, Tensor)
            or class_labels.ndim != 1
            or class_labels.shape[0] != x.shape[0]
            or class_labels.is_floating_point()
            or class_labels.is_complex()
            or class_labels.dtype == torch.bool
        ):
            described = (
                f"shape {tuple(class_labels.shape)}, dtype {class_labels.dtype}"
                if isinstance(class_labels, Tensor)
                else type(class_labels).__name__
            )
            raise ValueError(
                f"class_labels must be an integer tensor of shape ({x.shape[0]},), got {described}"
            )

    def check_compatible(self, other: Denoiser, name: str = "other") -> None:
        """Raise ValueError unless ``other`` has the same channels, resolution and classes."""
        for attribute in ("in_channels", "sample_size", "num_classes"):
            mine, theirs = getattr(self, attribute), getattr(other, attribute, None)
            if mine != theirs:
                raise ValueError(
                    f"{name} has {attribute}={theirs!r} but this denoiser has {attribute}={mine!r}"
                )


_SIGMA_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("sigma_checks", default=True)


@contextlib.contextmanager
def trusted_sigmas() -> Iterator[None]:
    """Within this block tensor sigmas are not read back to the host (one device synchronisation
    per denoiser call): for callers whose levels come from a checked table (the modules' steps)."""
    token = _SIGMA_CHECKS.set(False)
    try:
        yield
    finally:
        _SIGMA_CHECKS.reset(token)


def sigma_checks_enabled() -> bool:
    """False inside :func:`trusted_sigmas`."""
    return _SIGMA_CHECKS.get()


class UNetPrecond(Denoiser):
    """A preconditioning around a diffusers ``UNet2DModel`` :math:`F_\\theta`:

    .. math::

        D(x; \\sigma) = c_{skip}(\\sigma)\\, x + c_{out}(\\sigma)\\,
            F_\\theta\\big(c_{in}(\\sigma)\\, x;\\ c_{noise}(\\sigma)\\big),

    the scalings given by a subclass (:meth:`scalings`, :meth:`time_input`): EDM's
    (:class:`EDMPrecond`) or the consistency models' boundary condition
    (:class:`~lightning_losses.diffusion.ConsistencyPrecond`). ``class_labels`` go to the UNet
    when it was built with ``num_class_embeds``; a UNet with a "learned" or "fourier" time
    embedding is refused.

    The UNet runs in its own parameter dtype; the scalings, the skip connection and the result
    are computed in ``x``'s dtype promoted to at least float32 (float64 inputs give float64
    outputs).

    ``sigma`` must be finite and > 0 (the time input takes :math:`\\ln\\sigma`): a float is
    checked for free, a tensor with one host read per call (skipped inside
    :func:`trusted_sigmas`, for callers whose levels are checked already).

    Args:
        unet: a ``UNet2DModel`` with ``out_channels == in_channels``, or a module with the same
            call signature ``unet(sample, timestep, class_labels=None, return_dict=False)`` and a
            ``config`` holding ``in_channels``, ``out_channels``, ``sample_size``,
            ``time_embedding_type`` and ``num_class_embeds``.
        sigma_data: the data standard deviation :math:`\\sigma_d` (0.5 for [-1, 1] images).
        sigma_min: the smallest noise level it is trained / sampled at (EDM: 0.002).
        sigma_max: the largest noise level (EDM: 80).
    """

    def __init__(
        self,
        unet: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        owner = type(self).__name__
        _check_unet(unet, owner)
        in_channels = int(_config_value(unet, "in_channels"))
        out_channels = int(_config_value(unet, "out_channels", in_channels))
        if out_channels != in_channels:
            raise ValueError(
                f"{owner} needs a UNet with out_channels == in_channels, got in_channels="
                f"{in_channels}, out_channels={out_channels}"
            )
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        super().__init__(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            in_channels=in_channels,
            sample_size=_config_value(unet, "sample_size"),
            num_classes=_config_value(unet, "num_class_embeds"),
        )
        self.unet = unet
        self.sigma_data = float(sigma_data)

    #: The dtype :meth:`time_input` is computed in (None: the working dtype of the scalings).
    time_dtype: torch.dtype | None = None

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` for a tensor of noise levels (same shape and dtype)."""
        raise NotImplementedError

    def time_input(self, sigma: Tensor) -> Tensor:
        """:math:`c_{noise}`, the UNet's timestep, for ``(B,)`` levels in ``time_dtype``."""
        raise NotImplementedError

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for a tensor of noise levels (same shape)."""
        return (*self.scalings(sigma), self.time_input(sigma))

    def check_sigma(self, sigma: float | Tensor) -> None:
        """Raise ValueError unless every noise level is finite and > 0 (one host read)."""
        if isinstance(sigma, Tensor):
            if not sigma_checks_enabled() or sigma.numel() == 0:
                return
            ok = bool(torch.logical_and(sigma > 0, sigma.isfinite()).all())
        else:
            ok = math.isfinite(sigma) and sigma > 0
        if not ok:
            shown = sigma.detach().flatten()[:8].tolist() if isinstance(sigma, Tensor) else sigma
            raise ValueError(
                f"sigma must be finite and > 0 for {type(self).__name__} (it takes ln sigma), "
                f"got {shown}"
            )

    def forward(
        self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """``D(x; sigma)`` of the class docstring."""
        self.check_inputs(x, class_labels)
        if not isinstance(sigma, bool) and isinstance(sigma, int | float | Tensor):
            self.check_sigma(sigma)
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma_flat = per_sample_sigma(sigma, x, dtype)
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in self.scalings(sigma_flat))
        sigma_t = (
            sigma_flat if self.time_dtype is None else per_sample_sigma(sigma, x, self.time_dtype)
        )
        timestep = self.time_input(sigma_t).to(torch.float32)
        x = x.to(dtype)
        unet_in = (c_in * x).to(_module_dtype(self.unet, dtype))
        if self.num_classes is None:
            out = self.unet(unet_in, timestep, return_dict=False)[0]
        else:
            out = self.unet(unet_in, timestep, class_labels=class_labels, return_dict=False)[0]
        return c_skip * x + c_out * out.to(dtype)


class EDMPrecond(UNetPrecond):
    """EDM preconditioning (Karras et al. 2022) around a ``UNet2DModel``, a
    :class:`UNetPrecond` with

    .. math::

        c_{skip} = \\frac{\\sigma_d^2}{\\sigma^2 + \\sigma_d^2}, \\quad
        c_{out} = \\frac{\\sigma\\, \\sigma_d}{\\sqrt{\\sigma^2 + \\sigma_d^2}}, \\quad
        c_{in} = \\frac{1}{\\sqrt{\\sigma^2 + \\sigma_d^2}}, \\quad
        c_{noise} = \\tfrac14 \\ln \\sigma,

    :math:`\\sigma_d` = ``sigma_data``. :math:`c_{noise}` is fractional and negative for
    :math:`\\sigma < 1`, which the "positional" (sinusoidal) time embedding accepts.
    :meth:`save_pretrained` / :meth:`from_pretrained` write and read a local folder
    (``unet/`` + ``edm_config.json``).
    """

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def time_input(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4

    def edm_config(self) -> dict[str, Any]:
        """The JSON-able description :meth:`save_pretrained` writes next to the UNet."""
        return {
            "_class_name": "EDMPrecond",
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "class_conditional": self.num_classes is not None,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "sample_size": self.sample_size,
        }

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        overwrite: bool = False,
        extra_config: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``path/unet/`` (diffusers config + safetensors) and ``path/edm_config.json``.

        Refuses a folder that already holds a saved model unless ``overwrite=True``
        (:func:`~lightning_losses.diffusion.loading.refuse_overwrite`). Returns the folder.
        """
        from lightning_losses.diffusion.loading import save_edm

        return save_edm(self, path, overwrite=overwrite, extra_config=extra_config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> EDMPrecond:
        """The denoiser in a LOCAL folder written by :meth:`save_pretrained` (eval mode).

        Every key of :meth:`edm_config` must be in ``edm_config.json`` (a missing one is named);
        nothing is downloaded.
        """
        from lightning_losses.diffusion.loading import load_edm

        return load_edm(path)


class DiffusersEpsDenoiser(Denoiser):
    """A diffusers DDPM model (``UNet2DModel`` + a scheduler) as an EDM-space denoiser.

    The scheduler's cumulative products :math:`\\bar\\alpha_t` define the discrete noise levels
    of the variance-preserving process :math:`x^{vp}_t = \\sqrt{\\bar\\alpha_t}\\, x_0 +
    \\sqrt{1 - \\bar\\alpha_t}\\, \\epsilon`, which in EDM sigma space is
    :math:`x = x^{vp} / \\sqrt{\\bar\\alpha} = x_0 + \\sigma \\epsilon` with

    .. math::

        \\sigma_t = \\sqrt{(1 - \\bar\\alpha_t) / \\bar\\alpha_t}, \\qquad
        \\bar\\alpha = 1 / (1 + \\sigma^2), \\qquad x^{vp} = x / \\sqrt{1 + \\sigma^2}.

    For a noise level :math:`\\sigma`, first clamped into ``[sigma_min, sigma_max]`` (the table's
    range: the default linear betas 1e-4..0.02 over 1000 steps give [0.0100, 157.4]), the
    timestep :math:`t(\\sigma)` is the linear interpolation of t over the :math:`\\ln \\sigma_t`
    table (a fractional t between grid points, an exact integer on the grid), and with
    :math:`m = F_\\theta(x^{vp}, t(\\sigma))`:

    .. math::

        \\text{epsilon:}\\quad D = x - \\sigma m, \\qquad
        \\text{v\\_prediction:}\\quad
            D = \\sqrt{\\bar\\alpha}\\, x^{vp} - \\sqrt{1-\\bar\\alpha}\\, m, \\qquad
        \\text{sample:}\\quad D = m.

    Clamping means ``D(x, sigma) == D(x, clamp(sigma, sigma_min, sigma_max))``: below the table
    the model is evaluated as if the noise were ``sigma_min``, above it as if it were
    ``sigma_max``. Callers that sample noise levels for the teacher should draw them inside
    ``[sigma_min, sigma_max]``.

    A UNet whose ``out_channels`` is twice ``in_channels`` (learned variance) is accepted: the
    first ``in_channels`` output channels are the prediction. The "learned" and "fourier" time
    embeddings are refused (fractional timesteps need the "positional" one).

    Args:
        unet: a ``UNet2DModel`` (or a module with its call signature and ``config``).
        scheduler: any object with ``alphas_cumprod`` (a DDPM / DDIM / ... diffusers scheduler);
            ``scheduler.config.prediction_type`` is read unless ``prediction_type`` is given.
        prediction_type: "epsilon", "v_prediction" or "sample"; overrides the scheduler's.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, prediction_type: str | None = None) -> None:
        _check_unet(unet, "DiffusersEpsDenoiser")
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(
                f"scheduler must have an `alphas_cumprod` table (a diffusers DDPM-style "
                f"scheduler), got {type(scheduler).__name__}"
            )
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
        if abar.numel() < 2:
            raise ValueError(
                f"scheduler.alphas_cumprod must hold at least 2 timesteps, got {abar.numel()}"
            )
        if not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError(
                "scheduler.alphas_cumprod must lie strictly inside (0, 1): a value of 0 (a "
                "zero-terminal-SNR schedule) means an infinite sigma, which no EDM-space denoiser "
                "can be evaluated at"
            )
        sigmas = ((1 - abar) / abar).sqrt()
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError(
                "scheduler.alphas_cumprod must be strictly decreasing (sigma_t strictly "
                "increasing in t) to map sigma to a timestep"
            )
        if prediction_type is None:
            config = getattr(scheduler, "config", None)
            prediction_type = (
                config.get("prediction_type", "epsilon")
                if isinstance(config, dict)
                else getattr(config, "prediction_type", "epsilon")
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        in_channels = int(_config_value(unet, "in_channels"))
        out_channels = int(_config_value(unet, "out_channels", in_channels))
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(
                f"the UNet must have out_channels equal to in_channels (or twice it, with a "
                f"learned variance), got in_channels={in_channels}, out_channels={out_channels}"
            )
        super().__init__(
            sigma_min=float(sigmas[0]),
            sigma_max=float(sigmas[-1]),
            in_channels=in_channels,
            sample_size=_config_value(unet, "sample_size"),
            num_classes=_config_value(unet, "num_class_embeds"),
        )
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        # Plain tensors, not buffers: `module.to(torch.bfloat16)` must not round the table.
        self._log_sigmas = sigmas.log()
        self._tables: dict[torch.device, Tensor] = {}

    @property
    def sigma_table(self) -> Tensor:
        """The float64 ``sigma_t`` of every integer timestep t (ascending, a copy)."""
        return self._log_sigmas.exp()

    def _log_sigma_table(self, device: torch.device) -> Tensor:
        table = self._tables.get(device)
        if table is None:
            table = self._log_sigmas.to(device)
            self._tables[device] = table
        return table

    def timestep(self, sigma: Tensor) -> Tensor:
        """The fractional timestep ``t(sigma)`` (float64) of each noise level, after clamping.

        Linear interpolation of t over the ``ln sigma_t`` table: with
        :math:`\\ln\\sigma_i \\le \\ln\\sigma < \\ln\\sigma_{i+1}`,
        :math:`t = i + (\\ln\\sigma - \\ln\\sigma_i) / (\\ln\\sigma_{i+1} - \\ln\\sigma_i)`.
        """
        table = self._log_sigma_table(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp(self.sigma_min, self.sigma_max).log()
        # The clamp's bounds and the table come from the same float64 values: log() is exact.
        log_sigma = log_sigma.clamp(table[0], table[-1])
        index = (torch.searchsorted(table, log_sigma) - 1).clamp(0, table.numel() - 2)
        low, high = table[index], table[index + 1]
        return index.to(torch.float64) + (log_sigma - low) / (high - low)

    def forward(
        self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None
    ) -> Tensor:
        """``D(x; sigma)`` from the wrapped DDPM model (sigma clamped to the teacher's range)."""
        self.check_inputs(x, class_labels)
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma64 = per_sample_sigma(sigma, x, torch.float64).clamp(self.sigma_min, self.sigma_max)
        timestep = self.timestep(sigma64).to(torch.float32)
        sigma_b = sigma64.to(dtype).view(-1, 1, 1, 1)
        scale = 1 / (1 + sigma_b**2).sqrt()
        x = x.to(dtype)
        x_vp = x * scale
        unet_in = x_vp.to(_module_dtype(self.unet, dtype))
        if self.num_classes is None:
            out = self.unet(unet_in, timestep, return_dict=False)[0]
        else:
            out = self.unet(unet_in, timestep, class_labels=class_labels, return_dict=False)[0]
        out = out[:, : self.in_channels].to(dtype)
        if self.prediction_type == "epsilon":
            return x - sigma_b * out
        if self.prediction_type == "v_prediction":
            # sqrt(abar) = 1 / sqrt(1 + sigma^2) = scale, sqrt(1 - abar) = sigma * scale.
            return scale * x_vp - sigma_b * scale * out
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        subfolder: str | None = None,
        prediction_type: str | None = None,
    ) -> DiffusersEpsDenoiser:
        """Load a teacher from a LOCAL diffusers folder (never from the hub), in eval mode.

        Under ``path`` (or ``path/subfolder``): a pipeline folder (``DDPMPipeline.
        save_pretrained``: ``unet/`` + ``scheduler/scheduler_config.json``) or a flat unet +
        scheduler pair (``config.json`` + weights + ``scheduler_config.json``). The scheduler
        class named in its config is used when diffusers has it, else ``DDPMScheduler``.

        Raises:
            FileNotFoundError: when the folder or the expected files are missing.
            ValueError: for another model than a ``UNet2DModel``, or unreadable weights.
        """
        from lightning_losses.diffusion.loading import load_ddpm

        return load_ddpm(cls, path, subfolder, prediction_type)
