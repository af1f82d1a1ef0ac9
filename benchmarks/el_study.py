"""Does the Embedding Loss lower digits-FID, and in fewer iterations, for DMD, DI and CM?

For each framework, with and without EL, over several seeds, one digits config
(``configs/distillation/digits_{dmd,di,cm}[_el].yaml``, the committed digits teacher) is trained
for the same number of generator updates; digits-FID (2,000 samples of the EMA generator against
all 1,797 real digits, fixed noise) is measured at every 10% of the run. The EL arm and the
no-EL arm of a seed share the initial generator, the noise stream and the data order.

Reported per framework: the final digits-FID (mean ± std over seeds), the paired difference
EL - no EL per seed, and the paper's "fewer iterations" figure: the first checkpoint at which
the EL arm reaches the no-EL arm's FINAL FID of the same seed (its share of the run; "not
reached" when it never does). A plot of FID against generator steps goes to
``docs/figures/el_study.png``.

    python benchmarks/el_study.py                      # main table (< 1 h on 2 CPU cores)
    python benchmarks/el_study.py --quick              # a smoke run in minutes
    python benchmarks/el_study.py --ablation           # EL's own knobs, on DMD
    python benchmarks/el_study.py --part supplements   # none / regression / GAN / EL, DMD + DI
    python benchmarks/el_study.py --part batch         # DMD at B = 16, 64, 256, with / without EL
    python benchmarks/el_study.py --part equal-share   # EL's knobs at one gradient share
    python benchmarks/el_study.py --part di-auto       # Diff-Instruct with EL's automatic weight
    python benchmarks/el_study.py --part variance      # the generator's gradient-variance floor

The ablation varies EL's weight (x1/4, x4), the kernel (linear), the number of random networks
(1, 8) and the automatic weight (``el_weight_mode="auto"``: EL's gradient at the generator's
output held at a fraction of the base loss's) on DMD, over the same seeds. EL sums its MMD over
the feature maps of all networks, so 1 vs 4 vs 8 networks also changes EL's effective weight:
``--part equal-share`` compares the networks and the kernel at ONE gradient share instead.

``--part supplements`` is the comparison the EL paper argues: EL against the supplementary
losses it replaces, DMD1's regression loss (pseudo-Huber on 1,000 teacher Heun pairs; LPIPS
needs weights we cannot download) and DMD2's GAN head on the fake denoiser's bottleneck. Every
supplementary loss gets the SAME automatic weight (its gradient at the generator's output held
at ``SHARE`` times the base loss's; our protocol: no published digits weights exist, and equal
shares make the losses comparable without a grid search per loss). ``--part variance`` measures,
after each arm's training, the variance of the generator's gradient over K = 8 independent
batches at B = 16, 64, 256 for the base loss and for base + the arm's term, and fits a + b/B
(the floor a; callbacks/gradient_variance.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_losses.demo.distillation import TEACHER, distill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import paired_interval, verdict  # noqa: E402

STEPS = {"DMD": 150, "DI": 200, "CM": 300}
#: The gradient share every supplementary loss is held at (``weight_mode="auto"``).
SHARE = 0.5

#: name -> (el, el_weight override, model overrides) of the DMD ablation.
ABLATION: dict[str, tuple[bool, float | None, dict[str, Any]]] = {
    "no EL": (False, None, {}),
    "EL (config)": (True, None, {}),
    "EL weight x1/4": (True, 0.0005, {}),
    "EL weight x4": (True, 0.008, {}),
    "EL linear kernel": (
        True,
        None,
        {
            "embedding_loss": {
                "class_path": "lightning_losses.losses.EmbeddingLoss",
                "init_args": {
                    "kernel": "linear",
                    "bank": {
                        "class_path": "lightning_losses.nets.RandomEmbedderBank",
                        "init_args": {"in_channels": 1},
                    },
                },
            }
        },
    ),  # fmt: skip
    "EL 1 network": (
        True,
        None,
        {
            "embedding_loss": {
                "class_path": "lightning_losses.losses.EmbeddingLoss",
                "init_args": {
                    "bank": {
                        "class_path": "lightning_losses.nets.RandomEmbedderBank",
                        "init_args": {"in_channels": 1, "num_networks": 1},
                    }
                },
            }
        },
    ),  # fmt: skip
    "EL 8 networks": (
        True,
        None,
        {
            "embedding_loss": {
                "class_path": "lightning_losses.losses.EmbeddingLoss",
                "init_args": {
                    "bank": {
                        "class_path": "lightning_losses.nets.RandomEmbedderBank",
                        "init_args": {"in_channels": 1, "num_networks": 8},
                    }
                },
            }
        },
    ),  # fmt: skip
    "EL auto weight 0.5": (True, 0.5, {"el_weight_mode": "auto"}),
}


def first_reaching(history: list[tuple[int, float]], threshold: float) -> float | None:
    """The first step at which the FID curve reaches ``threshold`` (None: never).

    Between two checkpoints the curve is interpolated linearly in log FID, so the answer is
    finer than the checkpoint spacing; a first checkpoint already at or below it gives its step.
    """
    previous: tuple[int, float] | None = None
    for step, fid in history:
        if fid <= threshold:
            if previous is None or previous[1] <= fid:
                return float(step)
            (s0, f0), (s1, f1) = previous, (step, fid)
            t = (math.log(f0) - math.log(threshold)) / (math.log(f0) - math.log(f1))
            return s0 + t * (s1 - s0)
        previous = (step, fid)
    return None


def fid_at(history: list[tuple[int, float]], step: int) -> float:
    """The FID of the checkpoint nearest to ``step``."""
    return min(history, key=lambda item: abs(item[0] - step))[1]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def run_arm(framework: str, el: bool, seed: int, steps: int, every: int, samples: int,
            el_weight: float | None = None, overrides: dict | None = None,
            data: dict | None = None, keep_model: bool = False) -> dict:  # fmt: skip
    start = time.perf_counter()
    out = distill(framework, el, seed, steps, every, el_weight=el_weight,
                  model_overrides=overrides, fid_samples=samples, data_overrides=data)  # fmt: skip
    result = {
        "history": out["history"],
        "fid": out["fid"],
        "seconds": out["seconds"],
        "wall": time.perf_counter() - start,
        "el_weight": out["model"].el_weight,
    }
    if keep_model:
        result["model"] = out["model"]
    return result


def _bank(**init_args: Any) -> dict:
    return {
        "class_path": "lightning_losses.losses.EmbeddingLoss",
        "init_args": {
            **{k: v for k, v in init_args.items() if k == "kernel"},
            "bank": {
                "class_path": "lightning_losses.nets.RandomEmbedderBank",
                "init_args": {
                    "in_channels": 1,
                    **{k: v for k, v in init_args.items() if k != "kernel"},
                },
            },
        },
    }


def supplement_arms(pairs: Path) -> dict[str, tuple[bool, float | None, dict[str, Any]]]:
    """name -> (el, el_weight, model overrides): none / regression / GAN / EL at one share."""
    auto = {"weight": SHARE, "weight_mode": "auto"}
    regression = {"class_path": "lightning_losses.modules.RegressionSupplement",
                  "init_args": {"pairs_path": str(pairs), **auto}}  # fmt: skip
    gan = {"class_path": "lightning_losses.modules.GANSupplement", "init_args": auto}
    return {
        "none": (False, None, {}),
        "regression": (False, None, {"supplementary_losses": [regression]}),
        "GAN": (False, None, {"supplementary_losses": [gan]}),
        "EL": (True, SHARE, {"el_weight_mode": "auto"}),
    }


#: EL's knobs at one gradient share (``--part equal-share``).
_AUTO = {"el_weight_mode": "auto"}
EQUAL_SHARE: dict[str, tuple[bool, float | None, dict[str, Any]]] = {
    "no EL": (False, None, {}),
    "EL, 4 networks": (True, SHARE, _AUTO),
    "EL, 1 network": (True, SHARE, {**_AUTO, "embedding_loss": _bank(num_networks=1)}),
    "EL, 8 networks": (True, SHARE, {**_AUTO, "embedding_loss": _bank(num_networks=8)}),
    "EL, linear kernel": (True, SHARE, {**_AUTO, "embedding_loss": _bank(kernel="linear")}),
}


def teacher_pairs(out: Path, num_pairs: int = 1000) -> Path:
    """The regression loss's pairs of the committed digits teacher (made once, 18 Heun steps)."""
    from lightning_losses.diffusion import load_denoiser, make_teacher_pairs, save_teacher_pairs

    path = out / f"digits_teacher_pairs_{num_pairs}.safetensors"
    if not path.is_file():
        save_teacher_pairs(make_teacher_pairs(load_denoiser(TEACHER), num_pairs, seed=0), path)
    return path


def real_digits(n: int = 512) -> torch.Tensor:
    """The first ``n`` training digits of the distillation configs' split, in [-1, 1]."""
    from lightning_losses.datamodules import DigitsDataModule

    data = DigitsDataModule(batch_size=n, image_size=8, normalize="symmetric",
                            val_fraction=0.1, test_fraction=0.1, seed=0)  # fmt: skip
    data.setup("fit")
    images = next(iter(data.train_dataloader()))
    return images[0] if isinstance(images, list | tuple) else images


def compare(results: dict[str, list[dict]], total: int, reference: str) -> list[str]:
    """Rows: FID mean ± std, paired difference to ``reference`` with its 95% interval and
    verdict, iterations to the reference's final / mid-run FID, fit time ratio."""
    base = results[reference]
    lines = [
        f"| arm | digits-FID | minus {reference}: mean [95% interval] | verdict | reaches "
        f"{reference}'s final FID at | reaches its mid-run FID at ({reference}: 50%) | fit time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        fid = mean_std([r["fid"] for r in rows])
        if name == reference or len(rows) < 2:
            interval, word = "—", "—"
        else:
            mean, low, high = paired_interval([r["fid"] - b["fid"] for r, b in zip(rows, base)])
            interval = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
            word = verdict(low, high, lower_is_better=True)
        found = [
            (first_reaching(r["history"], b["fid"]),
             first_reaching(r["history"], fid_at(b["history"], total // 2)))
            for r, b in zip(rows, base)
        ]  # fmt: skip
        final, middle = (
            ", ".join("—" if f[i] is None else f"{f[i] / total:.0%}" for f in found) for i in (0, 1)
        )
        ratio = statistics.mean(r["seconds"] for r in rows) / statistics.mean(
            b["seconds"] for b in base
        )
        lines.append(
            f"| {name} | {fid} | {interval} | {word} | {final} | {middle} | {ratio:.2f}x |"
        )
    return lines


def run_part(part: str, args: argparse.Namespace, steps: dict[str, int]) -> str:
    """``--part supplements | batch | equal-share | di-auto | variance``: run it, return the
    markdown (also written to ``<out>/<part>.md``, the runs to ``<out>/<part>.json``)."""
    from lightning_losses.callbacks import generator_gradient_variance

    frameworks = {"supplements": ["DMD", "DI"], "variance": ["DMD"], "batch": ["DMD"],
                  "equal-share": ["DMD"], "di-auto": ["DI"]}[part]  # fmt: skip
    frameworks = [f for f in frameworks if f in args.frameworks]  # --frameworks narrows it
    pairs = teacher_pairs(args.out) if part in ("supplements", "variance") else None
    arms_of = {
        "supplements": lambda: supplement_arms(pairs),
        "variance": lambda: supplement_arms(pairs),
        "equal-share": lambda: EQUAL_SHARE,
        "di-auto": lambda: {"no EL": (False, None, {}), "EL (config, fixed)": (True, None, {}),
                            "EL auto": (True, SHARE, {"el_weight_mode": "auto"})},
        "batch": lambda: {f"{'EL' if el else 'no EL'}, B={b}": (el, None, {"_batch": b})
                          for b in args.batch_sizes for el in (False, True)},
    }  # fmt: skip
    real = real_digits() if part == "variance" else None
    saved: dict[str, Any] = {"seeds": list(args.seeds), "samples": args.samples}
    for framework in frameworks:
        total = steps[framework]
        every = max(1, total // 10)
        results: dict[str, list[dict]] = {}
        variances: dict[str, list[dict]] = {}
        arms = arms_of[part]()
        unknown = sorted(set(args.arms or ()) - set(arms))
        if unknown:
            raise SystemExit(f"--arms: {unknown} are not arms of --part {part}: {list(arms)}")
        for name, (el, weight, overrides) in arms.items():
            if args.arms and name not in args.arms:
                continue
            overrides = dict(overrides)
            data = {"batch_size": overrides.pop("_batch")} if "_batch" in overrides else None
            for seed in args.seeds:
                r = run_arm(framework, el, seed, total, every, args.samples, weight, overrides,
                            data, keep_model=part == "variance")  # fmt: skip
                if part == "variance":
                    model = r.pop("model")
                    v = generator_gradient_variance(model, real, (16, 64, 256), 8, seed=seed)
                    variances.setdefault(name, []).append(v)
                r["seed"] = seed
                results.setdefault(name, []).append(r)
                print(f"{part} {framework} {name} seed {seed}: {r['fid']:.3f} "
                      f"({r['seconds']:.0f} s)", flush=True)  # fmt: skip
                # after every run, so a stopped run keeps what it finished
                saved[framework] = {"steps": total, "runs": results, "variances": variances}
                (args.out / f"{part}.json").write_text(json.dumps(saved, indent=1, default=str))
    return part_tables(part, saved, args.out)


def merge_parts(part: str, folders: list[Path]) -> dict[str, Any]:
    """One ``<part>.json`` from runs of one part split by seed or by arm (``--batch-sizes``):
    each arm's runs sorted by seed so the arms stay paired; every arm must have each seed once."""
    merged: dict[str, Any] = {"seeds": [], "samples": None}
    for folder in folders:
        saved = json.loads((folder / f"{part}.json").read_text())
        folder_seeds = saved.pop("seeds")
        merged["seeds"] += [s for s in folder_seeds if s not in merged["seeds"]]
        merged["samples"] = saved.pop("samples")
        for framework, block in saved.items():
            target = merged.setdefault(framework, {"steps": block["steps"], "runs": {},
                                                   "variances": {}})  # fmt: skip
            if target["steps"] != block["steps"]:
                raise ValueError(f"{folder}: {framework} ran another number of steps")
            for name, rows in block["runs"].items():
                # rows saved before they carried their seed ran in the folder's seed order
                for seed, row in zip(folder_seeds, rows):
                    row.setdefault("seed", seed)
                target["runs"].setdefault(name, []).extend(rows)
                variances = block["variances"].get(name, [])
                for row, variance in zip(rows, variances):
                    row["_variance"] = variance
    merged["seeds"].sort()
    for block in (b for k, b in merged.items() if k not in ("seeds", "samples")):
        for name, rows in block["runs"].items():
            if sorted(r["seed"] for r in rows) != merged["seeds"]:
                raise ValueError(f"--merge: {name} ran seeds {[r['seed'] for r in rows]}, "
                                 f"not each of {merged['seeds']} once")  # fmt: skip
            rows.sort(key=lambda r: r["seed"])
            if any("_variance" in r for r in rows):
                block["variances"][name] = [r.pop("_variance") for r in rows]
    return merged


def batch_pairs(results: dict[str, list[dict]]) -> list[str]:
    """``--part batch``: EL - no EL at each batch size, and EL at each smaller batch - no EL at
    the largest (the paper's "smaller batch" claim), paired by seed, with intervals."""
    sizes = sorted({int(name.rsplit("B=", 1)[1]) for name in results})
    largest = sizes[-1]
    pairs = [(f"EL - no EL at B={b}", f"EL, B={b}", f"no EL, B={b}") for b in sizes]
    pairs += [(f"EL at B={b} - no EL at B={largest}", f"EL, B={b}", f"no EL, B={largest}")
              for b in sizes[:-1]]  # fmt: skip
    lines = ["| comparison | mean [95% interval] | per seed | verdict |", "|---|---|---|---|"]
    for label, first, second in pairs:
        if first not in results or second not in results:
            continue
        diffs = [a["fid"] - b["fid"] for a, b in zip(results[first], results[second])]
        if len(diffs) < 2:
            continue
        mean, low, high = paired_interval(diffs)
        per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
        word = verdict(low, high, lower_is_better=True)
        lines.append(f"| {label} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | {per_seed} | {word} |")
    return lines


def part_tables(part: str, saved: dict[str, Any], out: Path) -> str:
    """The markdown of a part's runs (written to ``<out>/<part>.md``)."""
    from lightning_losses.callbacks import fit_variance_floor

    sections = []
    for framework, block in saved.items():
        if framework in ("seeds", "samples"):
            continue
        total, results, variances = block["steps"], block["runs"], block["variances"]
        head = (f"{framework}, {total} generator steps, seeds {saved['seeds']}, "
                f"{saved['samples']} samples per digits-FID.")  # fmt: skip
        reference = next(iter(results))
        if part == "batch":  # every arm against no EL at the largest batch
            reference = max((n for n in results if n.startswith("no EL")),
                            key=lambda n: int(n.rsplit("B=", 1)[1]))  # fmt: skip
        lines = compare(results, total, reference)
        if part == "batch":
            lines += ["", *batch_pairs(results)]
        if variances:
            lines += ["", "| arm | objective | V(16) | V(64) | V(256) | floor a (mean ± std "
                      "over seeds) | b |", "|---|---|---|---|---|---|---|"]  # fmt: skip
            for name, per_seed in variances.items():
                for objective in per_seed[0]:
                    by = [{int(b): v for b, v in d[objective].items()} for d in per_seed]
                    fits = [fit_variance_floor(list(d), list(d.values())) for d in by]
                    cells = [f"{statistics.mean(d[b] for d in by):.3g}" for b in (16, 64, 256)]
                    floors = [f.floor for f in fits]
                    spread = statistics.stdev(floors) if len(floors) > 1 else 0.0
                    lines.append(
                        f"| {name} | {objective} | {' | '.join(cells)} | "
                        f"{statistics.mean(floors):.3g} ± {spread:.2g} | "
                        f"{statistics.mean(f.slope for f in fits):.3g} |"
                    )
        sections.append(head + "\n\n" + "\n".join(lines))
    table = "\n\n".join(sections)
    (out / f"{part}.md").write_text(table + "\n")
    return table


def main_table(runs: dict[str, dict[str, list[dict]]], steps: dict[str, int]) -> list[str]:
    lines = [
        "| framework | generator steps | digits-FID, no EL | digits-FID, EL | EL - no EL per seed "
        "| EL reaches no-EL's final FID at (per seed) | EL reaches no-EL's mid-run FID at "
        "(no EL: 50%) | fit time EL / no EL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for framework, arms in runs.items():
        base, el = arms["no EL"], arms["EL"]
        total = steps[framework]
        diffs = ", ".join(f"{e['fid'] - b['fid']:+.3f}" for b, e in zip(base, el))
        final, middle = [], []
        for b, e in zip(base, el):
            step = first_reaching(e["history"], b["fid"])
            final.append("not reached" if step is None else f"{step / total:.0%}")
            step = first_reaching(e["history"], fid_at(b["history"], total // 2))
            middle.append("not reached" if step is None else f"{step / total:.0%}")
        time_ratio = statistics.mean(e["seconds"] for e in el) / statistics.mean(
            b["seconds"] for b in base
        )
        lines.append(
            f"| {framework} | {total} | {mean_std([r['fid'] for r in base])} "
            f"| {mean_std([r['fid'] for r in el])} | {diffs} | {', '.join(final)} "
            f"| {', '.join(middle)} | {time_ratio:.2f} |"
        )
    return lines


def plot(runs: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.3 * len(runs), 3.5), squeeze=False)
    for ax, (framework, arms) in zip(axes[0], runs.items()):
        for (name, seeds), color in zip(arms.items(), ("tab:blue", "tab:orange", "tab:green")):
            for i, r in enumerate(seeds):
                steps, values = zip(*r["history"])
                ax.plot(steps, values, color=color, alpha=0.8, lw=1,
                        label=name if i == 0 else None)  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(framework)
        ax.set_xlabel("generator steps")
        ax.set_ylabel("digits-FID")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frameworks", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--steps", type=int, default=None, help="generator steps (all)")
    parser.add_argument("--samples", type=int, default=2000, help="samples per FID")
    parser.add_argument("--ablation", action="store_true", help="EL's knobs on DMD instead")
    parts = ["main", "ablation", "supplements", "batch", "equal-share", "di-auto", "variance"]
    parser.add_argument("--part", choices=parts, default=None, help="one part of the study")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="with --part: run only these arms (by name, e.g. 'no EL, B=256'); merge the folders",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="with --part: merge <part>.json of these folders (runs of other seeds) into --out",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 500 samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see README)")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="ablation: take the 'no EL' / 'EL (config)' DMD runs from this main.json (same "
        "seeds and steps: the runs are deterministic) instead of running them again",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "el_study")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="rebuild the tables (and the figure) from main.json / ablation.json in --out",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.samples = args.seeds[:1], args.steps or 20, 500
    steps = {f: args.steps or STEPS[f] for f in args.frameworks}
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    args.ablation = args.ablation or args.part == "ablation"

    if args.part not in (None, "main", "ablation"):
        if args.quick:
            args.batch_sizes = args.batch_sizes[:2]
        if args.merge:
            saved = merge_parts(args.part, args.merge)
            (args.out / f"{args.part}.json").write_text(json.dumps(saved, indent=1))
            table = part_tables(args.part, saved, args.out)
        else:
            table = run_part(args.part, args, {f: args.steps or STEPS[f] for f in STEPS})
    elif args.ablation:
        every = max(1, steps["DMD"] // 10)
        results: dict[str, list[dict]] = {}
        reused = json.loads(args.reuse.read_text())["DMD"] if args.reuse else {}
        main_seeds = json.loads(args.reuse.read_text()).get("seeds") if args.reuse else None
        if args.from_json:
            results = json.loads((args.out / "ablation.json").read_text())
        for name, (el, weight, overrides) in [] if args.from_json else ABLATION.items():
            for seed in args.seeds:
                key = {"no EL": "no EL", "EL (config)": "EL"}.get(name)
                if key in reused and main_seeds and seed in main_seeds:
                    r = reused[key][main_seeds.index(seed)]
                    if r["history"][-1][0] != steps["DMD"]:
                        raise ValueError(f"--reuse: {args.reuse} ran another number of steps")
                    results.setdefault(name, []).append(r)
                    print(f"ablation {name} seed {seed}: {r['fid']:.3f} (reused)")
                    continue
                r = run_arm("DMD", el, seed, steps["DMD"], every, args.samples, weight, overrides)
                results.setdefault(name, []).append(r)
                print(f"ablation {name} seed {seed}: {r['fid']:.3f} ({r['seconds']:.0f} s)")
        if not args.from_json:
            (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
        base = results["no EL"]
        lines = [
            f"DMD, {steps['DMD']} generator steps, seeds {args.seeds}, {args.samples} samples.",
            "",
            "| variant | digits-FID | minus no EL, per seed | reaches no-EL's final FID at "
            "| reaches no-EL's mid-run FID at (no EL: 50%) | fit time vs no EL |",
            "|---|---|---|---|---|---|",
        ]
        total = steps["DMD"]
        for name, rows in results.items():
            diffs = ", ".join(f"{r['fid'] - b['fid']:+.3f}" for r, b in zip(rows, base))
            final = [first_reaching(r["history"], b["fid"]) for r, b in zip(rows, base)]
            middle = [
                first_reaching(r["history"], fid_at(b["history"], total // 2))
                for r, b in zip(rows, base)
            ]
            final_text, middle_text = (
                ", ".join("—" if s is None else f"{s / total:.0%}" for s in found)
                for found in (final, middle)
            )
            ratio = statistics.mean(r["seconds"] for r in rows) / statistics.mean(
                b["seconds"] for b in base
            )
            lines.append(
                f"| {name} | {mean_std([r['fid'] for r in rows])} | {diffs} | {final_text} "
                f"| {middle_text} | {ratio:.2f} |"
            )
        table = "\n".join(lines)
        (args.out / "ablation.md").write_text(table + "\n")
    else:
        runs: dict[str, dict[str, list[dict]]] = {}
        if args.from_json:
            saved = json.loads((args.out / "main.json").read_text())
            args.seeds = saved.pop("seeds")
            runs = saved
            steps = {f: arms["no EL"][0]["history"][-1][0] for f, arms in runs.items()}
        for framework in [] if args.from_json else args.frameworks:
            every = max(1, steps[framework] // 10)
            for seed in args.seeds:
                for el in (False, True):
                    r = run_arm(framework, el, seed, steps[framework], every, args.samples)
                    runs.setdefault(framework, {}).setdefault("EL" if el else "no EL", []).append(r)
                    print(
                        f"{framework} {'EL' if el else 'no EL'} seed {seed}: {r['fid']:.3f} "
                        f"({r['seconds']:.0f} s)",
                        flush=True,
                    )
        if not args.from_json:
            main_json = json.dumps({"seeds": args.seeds, **runs}, indent=1)
            (args.out / "main.json").write_text(main_json)
        figure = args.figure or args.out / "el_study.png"
        plot(runs, figure)
        header = (
            f"Seeds {args.seeds}, {args.samples} samples per digits-FID, checkpoints every 10% "
            f"of the run; figure: {figure}."
        )
        table = header + "\n\n" + "\n".join(main_table(runs, steps))
        (args.out / "main.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
