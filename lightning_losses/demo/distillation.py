"""Demo part 3: one-step distillation of the committed digits teacher, with and without EL.

Every run is one of ``configs/distillation/digits_{dmd,di,cm}[_el].yaml`` through the CLI with
a few overrides (the seed, the committed teacher, the number of generator steps, digits-FID
every few steps), so the demo exercises exactly what a user runs. An arm with EL and the one
without share the seed, hence the same initial generator, noise stream and data order.

:func:`distill` is also what ``benchmarks/el_study.py`` runs, at more seeds and steps.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_losses.cli import packaged_config
from lightning_losses.demo import Task, part_results, run_tasks, save_figure

#: The committed digits teacher (``lightning_losses/assets/digits_teacher``).
TEACHER = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher"
#: framework -> config stem (``<stem>.yaml`` without EL, ``<stem>_el.yaml`` with EL).
FRAMEWORKS = {"DMD": "digits_dmd", "DI": "digits_di", "CM": "digits_cm"}


def config_path(framework: str, el: bool) -> Path:
    """The digits config of ``framework`` ("DMD", "DI", "CM"), with or without EL."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}")
    return packaged_config(f"distillation/{FRAMEWORKS[framework]}{'_el' if el else ''}.yaml")


def global_steps(model_args: dict[str, Any], class_path: str, generator_steps: int) -> int:
    """Lightning's ``max_steps`` for ``generator_steps`` generator updates.

    ``global_step`` counts every optimizer step: k fake-denoiser updates per generator update
    with a fake denoiser (DMD: k = 5, Diff-Instruct: k = 1), the generator's alone without one
    (consistency distillation).
    """
    if class_path.endswith("ConsistencyDistillation"):
        return generator_steps
    k = int(model_args.get("fake_updates_per_generator", 5 if "DMD" in class_path else 1))
    return generator_steps * (k + 1)


def distill(
    framework: str,
    el: bool,
    seed: int,
    generator_steps: int,
    fid_every: int | None = None,
    el_weight: float | None = None,
    model_overrides: dict[str, Any] | None = None,
    fid_samples: int = 2000,
    data_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one digits distillation config; return digits-FID history, time and the module.

    Args:
        framework: "DMD", "DI" or "CM".
        el: the ``_el`` config (EL on) or the plain one.
        seed: ``seed_everything`` of the run.
        generator_steps: generator updates to train.
        fid_every: digits-FID (2,000 EMA samples, fixed noise) every that many generator steps
            (None: only at the end).
        el_weight: override the config's EL weight (only with ``el=True``).
        model_overrides: more ``model.init_args`` overrides.
        fid_samples: generated samples per FID evaluation.
        data_overrides: ``data.init_args`` overrides (e.g. ``batch_size``).

    Returns:
        ``{"history": [(step, fid), ...], "fid": last fid, "seconds": fit time, "model": module}``.
    """
    from lightning_losses.callbacks import FIDCallback
    from lightning_losses.cli import run_config

    path = config_path(framework, el)
    config = yaml.safe_load(path.read_text())
    model_args = config["model"]["init_args"]
    model_args["teacher_path"] = str(TEACHER)
    if el_weight is not None:
        if not el:
            raise ValueError("el_weight is an override of the EL configs: pass el=True")
        model_args["el_weight"] = el_weight
    model_args.update(model_overrides or {})
    config["data"]["init_args"].update(data_overrides or {})
    config["seed_everything"] = seed
    config["trainer"].update(
        max_steps=global_steps(model_args, config["model"]["class_path"], generator_steps),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            {
                "class_path": "lightning_losses.callbacks.FIDCallback",
                "init_args": {
                    "feature": "digits",
                    "num_samples": fid_samples,
                    "every_n_steps": fid_every,
                    "name": "digits_fid",
                },
            }
        ],
    )
    with tempfile.TemporaryDirectory() as root:  # the CLI's config.yaml lands here
        config["trainer"]["default_root_dir"] = root
        cli = run_config(copy.deepcopy(config), subcommand=None)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        seconds = time.perf_counter() - start
    fid = next(c for c in cli.trainer.callbacks if isinstance(c, FIDCallback))
    steps = int(cli.model.generator_steps)
    if steps != generator_steps:
        raise RuntimeError(f"{path.name}: trained {steps} generator steps, not {generator_steps}")
    return {"history": list(fid.history), "fid": fid.history[-1][1], "seconds": seconds,
            "model": cli.model}  # fmt: skip


def _save_grids(samples: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples), 2.9))
    for ax, (name, images) in zip(axes, samples.items()):
        grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=8, padding=1, pad_value=1.0)
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    save_figure(fig, path, dpi=130)


def _plot_histories(runs: dict[str, dict], teacher_fid: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, run in runs.items():
        steps, values = zip(*run["history"])
        ax.plot(steps, values, marker="o", ms=3, label=name)
    ax.axhline(teacher_fid, color="gray", ls="--", lw=1, label="teacher (18 Heun steps)")
    ax.set_yscale("log")
    ax.set_xlabel("generator steps")
    ax.set_ylabel("digits-FID (2,000 EMA samples)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=130)


#: Each arm's expected seconds on one quiet core (the pool starts the longest first).
_COSTS = {"DMD": 100.0, "DMD+EL": 112.0, "DI": 35.0, "DI+EL": 41.0, "CM": 68.0, "CM+EL": 130.0}
ARMS = [("DMD", False), ("DMD", True), ("DI", False), ("DI", True), ("CM", False), ("CM", True)]
SEED = 0


def _settings(quick: bool) -> tuple[dict[str, int], dict[str, int], int]:
    steps = {"DMD": 4, "DI": 4, "CM": 4} if quick else {"DMD": 100, "DI": 100, "CM": 300}
    fid_every = {k: max(1, v // 5) for k, v in steps.items()}
    return steps, fid_every, 200 if quick else 2000


def teacher_reference(fid_samples: int) -> dict[str, Any]:
    """The teacher's digits-FID (18 Heun steps, fixed noise) and its first 64 samples."""
    from lightning_losses.diffusion import load_denoiser
    from lightning_losses.metrics.digits_fid import digits_fid

    samples = teacher_sample(load_denoiser(TEACHER), fid_samples)
    return {"fid": digits_fid(samples.clamp(-1, 1)), "grid": samples[:64]}


def distill_arm(framework: str, el: bool, quick: bool) -> dict[str, Any]:
    """One task of this part: :func:`distill` of one arm; its history, grid and EL weight."""
    import torch

    steps, fid_every, fid_samples = _settings(quick)
    outcome = distill(framework, el, SEED, steps[framework], fid_every[framework],
                      fid_samples=fid_samples)  # fmt: skip
    model = outcome.pop("model")
    outcome["grid"] = model.sample(64, generator=torch.Generator().manual_seed(1))
    outcome.update(framework=framework, el_weight=model.el_weight)
    name = framework + ("+EL" if el else "")
    print(f"{name}: digits-FID {outcome['fid']:.3f} ({outcome['seconds']:.0f} s)", flush=True)
    return outcome


def tasks(out_dir: Path, quick: bool = False) -> list[Task]:
    """The teacher's reference FID, then each (framework, EL) arm."""
    fid_samples = _settings(quick)[2]
    arms = [
        Task(
            "distillation",
            framework + ("+EL" if el else ""),
            distill_arm,
            {"framework": framework, "el": el, "quick": quick},
            cost=_COSTS[framework + ("+EL" if el else "")],
        )
        for framework, el in ARMS
    ]
    teacher = Task("distillation", "teacher", teacher_reference, {"fid_samples": fid_samples},
                   cost=30.0)  # fmt: skip
    return [teacher, *arms]


def run(out_dir: Path, quick: bool = False) -> str:
    """DMD, DMD + EL, DI and CM (with and without EL) on digits in this process; the report.

    Torch's thread count is the caller's (``python -m lightning_losses.demo`` sets 1).
    """
    return report(part_results(run_tasks(tasks(out_dir, quick)), "distillation"), out_dir, quick)


def report(outcomes: dict[str, Any], out_dir: Path, quick: bool = False) -> str:
    """Write ``distillation_results.json`` and the figures; return the markdown section."""
    seed = SEED
    steps, _, fid_samples = _settings(quick)
    teacher_fid = outcomes["teacher"]["fid"]
    grids = {"teacher (18 Heun steps)": outcomes["teacher"]["grid"]}
    runs: dict[str, dict] = {}
    for framework, el in ARMS:
        name = framework + ("+EL" if el else "")
        outcome = dict(outcomes[name])
        grids[name] = outcome.pop("grid")
        runs[name] = outcome
    (out_dir / "distillation_results.json").write_text(
        json.dumps({"teacher_fid": teacher_fid, "seed": seed, "runs": runs}, indent=1)
    )
    _save_grids(grids, out_dir / "distillation_samples.png")
    _plot_histories(runs, teacher_fid, out_dir / "distillation_fid.png")

    lines = [
        "## One-step distillation of the digits teacher, with and without EL",
        "",
        "The committed digits teacher (`lightning_losses/assets/digits_teacher`, EDM, 8x8) is "
        "distilled into a one-step generator by each framework's digits config "
        "(`configs/distillation/digits_{dmd,di,cm}[_el].yaml`), seed "
        f"{seed}, the same number of generator updates with and without EL. digits-FID: "
        f"{fid_samples:,} samples of the EMA generator against all 1,797 real digits in the "
        "features of the committed digits classifier (not comparable with Inception FID). "
        f"The teacher itself, sampled with 18 Heun steps (35 evaluations): **{teacher_fid:.3f}**. "
        "One seed: the multi-seed study is `benchmarks/el_study.py` (docs/RESULTS.md).",
        "",
        "| framework | EL weight | generator steps | digits-FID (1 step) | best on the way | "
        "fit time |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        best = min(v for _, v in r["history"])
        lines.append(
            f"| {name} | {r['el_weight']:g} | {steps[r['framework']]} | {r['fid']:.3f} "
            f"| {best:.3f} | {r['seconds']:.0f} s |"
        )
    lines += ["", "![FID during training](distillation_fid.png)", ""]
    lines += ["![samples](distillation_samples.png)", ""]
    return "\n".join(lines)


def teacher_sample(teacher: Any, n: int, seed: int = 0) -> Any:
    """``n`` samples of the teacher denoiser (EDM's 18-step Heun sampler), fixed noise."""
    import torch

    from lightning_losses.diffusion import edm_heun_sampler

    size = teacher.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    noise = torch.randn(n, teacher.in_channels, height, width,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return edm_heun_sampler(teacher, noise, num_steps=18)


def summarise(values: list[float]) -> str:
    """``mean ± std`` (sample std; 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"
