"""Reading and writing denoisers in LOCAL folders (nothing is downloaded).

Layouts:

- ``edm_config.json`` + ``unet/``: an :class:`~lightning_losses.diffusion.EDMPrecond`
  (:func:`save_edm` / :func:`load_edm`);
- a diffusers DDPM pipeline folder, ``model_index.json`` (optional) + ``unet/`` + ``scheduler/``,
  or a flat ``config.json`` + weights + ``scheduler_config.json``: a
  :class:`~lightning_losses.diffusion.DiffusersEpsDenoiser`.

:func:`load_denoiser` tells them apart, after refusing folders that hold a distilled generator.
Weights are read with safetensors through diffusers' loader; a file that cannot be read (a
truncated download) is named in the error. diffusers is imported when a UNet is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "EDM_CONFIG_NAME",
    "MODEL_MARKERS",
    "NOT_TEACHERS",
    "load_denoiser",
    "load_edm",
    "load_unet",
    "read_config",
    "refuse_overwrite",
    "save_edm",
]

EDM_CONFIG_NAME = "edm_config.json"
UNET_SUBFOLDER = "unet"
#: Files and folders whose presence means a folder already holds a saved model.
MODEL_MARKERS = (
    "model_index.json",
    EDM_CONFIG_NAME,
    UNET_SUBFOLDER,
    "config.json",
    "scheduler_config.json",
)
#: Pipeline classes whose folders hold a distilled generator, not a teacher.
NOT_TEACHERS = ("OneStepPipeline", "ConsistencyModelPipeline")
#: The keys ``edm_config.json`` must hold.
EDM_KEYS = ("sigma_data", "sigma_min", "sigma_max", "class_conditional", "num_classes")

_LAYOUTS = (
    "accepted layouts: edm_config.json + unet/ (DiffusionTeacher.save_pretrained or "
    "EDMPrecond.save_pretrained); a diffusers DDPM pipeline folder, model_index.json + unet/ + "
    "scheduler/ (e.g. a local copy of google/ddpm-cifar10-32); or config.json + "
    "scheduler_config.json side by side (a flat unet + scheduler pair)"
)


def refuse_overwrite(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Return ``path`` as a Path, raising if it already holds a saved model.

    Raises:
        FileExistsError: when ``path`` holds any of :data:`MODEL_MARKERS` and ``overwrite`` is
            False (saving would replace, or mix with, that model's files).
    """
    root = Path(path).expanduser()
    if root.is_dir() and not overwrite:
        found = sorted(name for name in MODEL_MARKERS if (root / name).exists())
        if found:
            raise FileExistsError(
                f"{str(root)!r} already holds a saved model ({', '.join(found)}): choose an "
                "empty folder, or pass overwrite=True to replace it"
            )
    return root


def read_config(file: Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """A JSON object from ``file``, with every key of ``required`` present.

    Raises:
        ValueError: when the file is not a JSON object or lacks a required key (named).
    """
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(file)!r} as JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(config).__name__}")
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{str(file)!r} lacks the key(s) {missing}; it needs {list(required)}")
    return config


def load_unet(unet_dir: Path) -> nn.Module:
    """The ``UNet2DModel`` in a local diffusers folder; an unreadable weight file is named.

    Raises:
        ValueError: when the folder holds another model class, or its files cannot be read.
    """
    unet_class = read_config(unet_dir / "config.json").get("_class_name")
    if unet_class not in (None, "UNet2DModel"):
        raise ValueError(f"{str(unet_dir)!r} holds a {unet_class}, not a UNet2DModel")
    from diffusers import UNet2DModel

    try:
        # low_cpu_mem_usage=False: the plain loader, without `accelerate` (and its notice).
        return UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError, ...
        weights = sorted(p.name for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise ValueError(
            f"cannot read the UNet in {str(unet_dir)!r} (weight files: {weights or 'none'}; "
            f"truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def save_edm(
    denoiser: Any,
    path: str | os.PathLike[str],
    overwrite: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write an EDMPrecond as ``path/unet/`` (safetensors) + ``path/edm_config.json``."""
    unet = getattr(denoiser.unet, "_orig_mod", denoiser.unet)
    if not hasattr(unet, "save_pretrained"):
        raise ValueError(
            f"save_pretrained needs a diffusers model (UNet2DModel), got {type(unet).__name__}; "
            "save its state_dict instead"
        )
    root = refuse_overwrite(path, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / UNET_SUBFOLDER, safe_serialization=True)
    config = {**denoiser.edm_config(), **(extra_config or {})}
    (root / EDM_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return root


def load_edm(path: str | os.PathLike[str]) -> Any:
    """The :class:`~lightning_losses.diffusion.EDMPrecond` of :func:`save_edm` (eval mode).

    Raises:
        FileNotFoundError: when ``edm_config.json`` or ``unet/config.json`` is missing.
        ValueError: for a missing config key, unreadable weights, or a config that disagrees
            with the UNet.
    """
    from lightning_losses.diffusion.denoisers import EDMPrecond

    root = Path(path).expanduser()
    config_file, unet_dir = root / EDM_CONFIG_NAME, root / UNET_SUBFOLDER
    if not config_file.is_file() or not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not an EDM denoiser folder: it needs {EDM_CONFIG_NAME} and "
            f"{UNET_SUBFOLDER}/config.json (local folders only; nothing is downloaded)"
        )
    config = read_config(config_file, EDM_KEYS)
    denoiser = EDMPrecond(
        load_unet(unet_dir),
        sigma_data=float(config["sigma_data"]),
        sigma_min=float(config["sigma_min"]),
        sigma_max=float(config["sigma_max"]),
    )
    conditional = bool(config["class_conditional"])
    if conditional != (denoiser.num_classes is not None) or (
        conditional and config["num_classes"] != denoiser.num_classes
    ):
        raise ValueError(
            f"{EDM_CONFIG_NAME} says class_conditional={conditional}, num_classes="
            f"{config['num_classes']} but the UNet has num_class_embeds={denoiser.num_classes}"
        )
    return denoiser.eval()


def load_ddpm(
    cls: Any, path: str | os.PathLike[str], subfolder: str | None, prediction_type: str | None
) -> Any:
    """:meth:`~lightning_losses.diffusion.DiffusersEpsDenoiser.from_pretrained`'s reader."""
    root = Path(path).expanduser()
    if subfolder:
        root = root / subfolder
    if not root.is_dir():
        raise FileNotFoundError(
            f"no local folder at {str(root)!r}: DiffusersEpsDenoiser.from_pretrained loads "
            "local diffusers folders only; download the pipeline first (for example "
            "`huggingface_hub.snapshot_download`) and pass its local path"
        )
    if (root / "unet" / "config.json").is_file():
        unet_dir, scheduler_dir = root / "unet", root / "scheduler"
    elif (root / "config.json").is_file() and (root / "scheduler_config.json").is_file():
        unet_dir = scheduler_dir = root
    else:
        raise FileNotFoundError(
            f"{str(root)!r} is neither a diffusers pipeline folder (unet/config.json and "
            "scheduler/scheduler_config.json) nor a unet + scheduler pair (config.json and "
            "scheduler_config.json side by side)"
        )
    scheduler_file = scheduler_dir / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"no scheduler config at {str(scheduler_file)!r}")

    import diffusers

    unet = load_unet(unet_dir)
    scheduler_config = read_config(scheduler_file)
    scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        scheduler_class = diffusers.DDPMScheduler
    scheduler = scheduler_class.from_config(scheduler_config)
    return cls(unet, scheduler, prediction_type=prediction_type).eval()


def load_denoiser(path: str | os.PathLike[str]) -> Any:
    """The teacher denoiser in a LOCAL folder, in eval mode (layouts in the module docstring).

    A folder whose ``model_index.json`` names a distilled generator (:data:`NOT_TEACHERS`) is
    refused first, whatever else it holds.

    Raises:
        FileNotFoundError: when ``path`` does not exist or matches no layout (the message lists
            them).
        ValueError: for a distilled generator's folder, another model than a ``UNet2DModel``, a
            missing config key or unreadable weights.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no denoiser folder at {str(root)!r}; {_LAYOUTS}")
    index = root / "model_index.json"
    if index.is_file():
        pipeline_class = read_config(index).get("_class_name")
        if pipeline_class in NOT_TEACHERS:
            raise ValueError(
                f"{str(root)!r} holds a distilled generator ({pipeline_class}), not a teacher: "
                "load it with lightning_losses.diffusion.OneStepPipeline.from_pretrained (or "
                "diffusers' ConsistencyModelPipeline)"
            )
    if (root / EDM_CONFIG_NAME).is_file():
        return load_edm(root)
    is_pipeline = index.is_file() or (
        (root / UNET_SUBFOLDER / "config.json").is_file()
        and (root / "scheduler" / "scheduler_config.json").is_file()
    )
    is_flat = (root / "config.json").is_file() and (root / "scheduler_config.json").is_file()
    if not (is_pipeline or is_flat):
        raise FileNotFoundError(f"{str(root)!r} holds no denoiser I can read; {_LAYOUTS}")
    from lightning_losses.diffusion.denoisers import DiffusersEpsDenoiser

    return DiffusersEpsDenoiser.from_pretrained(root)
