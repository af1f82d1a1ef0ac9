"""Train the CE digits classifier and export its backbone as the digits-FID feature network.

    OMP_NUM_THREADS=1 python scripts/make_digits_fid_features.py [--workdir DIR] [--output FILE]

1. ``lightning-losses fit --config configs/opl/digits_ce.yaml --seed_everything 0`` on the CPU,
   run inside ``--workdir`` (a temporary folder unless given), so the config's relative
   ``runs/...`` paths land there;
2. ``OPLClassifier.load_from_checkpoint`` of its ``last.ckpt``;
3. writes ONLY the backbone (``SmallCNN``) weights, the classifier's input normalisation
   (``input_mean`` / ``input_std``: the data module's ``(u - mean) / std`` on pixels u in
   [0, 1]) and a small metadata dict (config, seed, test accuracy, ...) as safetensors to
   ``lightning_losses/assets/digits_fid_features.safetensors``;
4. checks that the exported network on [-1, 1] digits gives the classifier backbone's features
   on the classifier's own inputs.

The file is read by :func:`lightning_losses.metrics.digits_fid_features`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs/opl/digits_ce.yaml"
DEFAULT_OUTPUT = REPO / "lightning_losses/assets/digits_fid_features.safetensors"


def train(config: Path, seed: int, workdir: Path) -> Path:
    """Run the CLI's fit in ``workdir``; return the last checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_losses",
        "fit",
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    print("$ (cd", workdir, "&&", " ".join(command), ")", flush=True)
    subprocess.run(command, cwd=workdir, env=env, check=True)
    checkpoints = sorted(workdir.rglob("last.ckpt"))
    if len(checkpoints) != 1:
        raise RuntimeError(f"expected one last.ckpt under {workdir}, found {checkpoints}")
    return checkpoints[0]


def export(config: Path, seed: int, checkpoint: Path, output: Path) -> dict[str, str]:
    """Write the feature file; return its metadata."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from lightning_losses.datamodules import DigitsDataModule
    from lightning_losses.metrics.digits_fid import (
        DIGITS_FID_COMMAND,
        DIGITS_FID_FORMAT,
        DigitsFIDFeatures,
    )
    from lightning_losses.modules import OPLClassifier
    from lightning_losses.nets import SmallCNN

    torch.set_num_threads(1)
    model = OPLClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    backbone = model.backbone
    if not isinstance(backbone, SmallCNN):
        raise TypeError(f"the config's backbone must be a SmallCNN, got {type(backbone).__name__}")

    spec = yaml.safe_load(config.read_text())
    data_args = dict(spec["data"].get("init_args", {}))
    if spec["data"]["class_path"].rsplit(".", 1)[-1] != "DigitsDataModule":
        raise ValueError(f"the config's data must be DigitsDataModule, got {spec['data']}")
    data = DigitsDataModule(**data_args)
    data.setup("fit")
    if data.image_size != 8:
        raise ValueError(
            f"digits-FID is defined at the native 8x8, the config has {data.image_size}"
        )
    # The classifier's input is (u - mean) / std for pixels u in [0, 1], whatever the mode.
    mean, std = {
        "standard": (data.mean, data.std),
        "symmetric": (0.5, 0.5),
        "none": (0.0, 1.0),
    }[data.normalize]

    with torch.no_grad():
        images, labels = data.test_dataset.tensors
        test_accuracy = float((model(images).argmax(1) == labels).double().mean())

    tensors = {
        f"backbone.{k}": v.detach().clone().contiguous() for k, v in backbone.state_dict().items()
    }
    tensors["input_mean"] = torch.tensor(mean, dtype=torch.float32)
    tensors["input_std"] = torch.tensor(std, dtype=torch.float32)
    in_channels = backbone.features[0].in_channels
    width = backbone.features[0].out_channels
    metadata = {
        "format": DIGITS_FID_FORMAT,
        "description": (
            "digits-FID features: the 64-d penultimate features of the CE digits classifier "
            "(SmallCNN) at 8x8; NOT comparable with Inception FID"
        ),
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "seed": str(seed),
        "command": DIGITS_FID_COMMAND,
        "test_accuracy": f"{test_accuracy:.6f}",
        "num_test": str(len(labels)),
        "data": json.dumps({"class_path": spec["data"]["class_path"], "init_args": data_args}),
        "normalize": data.normalize,
        "input_mean": repr(float(tensors["input_mean"])),
        "input_std": repr(float(tensors["input_std"])),
        "backbone": json.dumps(
            {
                "class_path": "lightning_losses.nets.SmallCNN",
                "in_channels": in_channels,
                "width": width,
                "feature_dim": backbone.feature_dim,
            }
        ),
        "torch": torch.__version__,
    }

    # The exported network on [-1, 1] digits == the classifier's backbone on its own inputs.
    check = DigitsFIDFeatures(mean, std, in_channels, width, backbone.feature_dim)
    check.backbone.load_state_dict(backbone.state_dict())
    symmetric_data = DigitsDataModule(**{**data_args, "normalize": "symmetric"})
    symmetric_data.setup("fit")
    with torch.no_grad():
        for split in ("train", "val", "test"):
            own = getattr(data, f"{split}_dataset").tensors[0]
            symmetric = getattr(symmetric_data, f"{split}_dataset").tensors[0]
            torch.testing.assert_close(check(symmetric), backbone(own), rtol=0, atol=0)

    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output), metadata=metadata)
    output.chmod(0o644)  # save_file leaves it private; the file ships in the package
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a temp dir")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="skip training, export this checkpoint"
    )
    args = parser.parse_args(argv)
    config = args.config.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or train(config, args.seed, workdir)
        metadata = export(config, args.seed, checkpoint, args.output.resolve())
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 1024:.0f} KiB)")
    print(json.dumps(metadata, indent=2))


if __name__ == "__main__":
    main()
