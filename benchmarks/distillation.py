"""Speed and memory of DMD distillation with and without the Embedding Loss (EL), and of MMD^2.

At the size of the digits demo (``configs/distillation/digits_dmd.yaml``, ``digits_dmd_el.yaml``):
the digits teacher (an ``EDMPrecond`` UNet with channels [32, 64], one ResNet layer per level, no
attention, 1 x 8 x 8 images, built as ``DiffusionTeacher`` builds it, with random weights unless
``--teacher`` names an exported teacher), batch 64, ``DMDDistillation`` with
``fake_updates_per_generator=5``, AdamW (lr 1e-4), both gradients clipped at norm 10, generator EMA
0.98, and ``el_weight`` 0 (no EL) against 0.002 (DMD + EL).

1. DMD training steps, the two arms interleaved in one process. The generator is updated at one
   training step in 5 (where EL applies); the other 4 update only the fake denoiser. Three kinds
   of step are timed: fake-only, generator step with the grad-norm logging off
   (``log_grad_norm_every=0``), and generator step WITH the grad-norm logging (its extra
   ``autograd.grad`` back to the generated images, of the DMD loss and, with EL, of EL; the
   configs do it every 10th generator step). Reported: medians, the EL / no-EL ratio of each
   with a bootstrap interval, and the averaged training step ``(4 fake-only + 1 generator) / 5``.
2. Peak memory of each kind of step, with and without EL.
3. A cross-check through Lightning's ``Trainer`` (logging off): the same ratio, and what the
   Trainer adds to a step.
4. ``mmd2`` and the full ``EmbeddingLoss(RandomEmbedderBank(C))`` (the module's default EL),
   forward+backward time and peak memory at B = 64 ... 1024 per side.

Usage (from the repository root)::

    python benchmarks/distillation.py --quick                 # about a minute
    python benchmarks/distillation.py --out distillation.md   # about 6 min on 2 busy cores

The markdown is printed and, with ``--out``, written to that file (replaced).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import QUIET_TRAINER  # noqa: E402

HEADING = "## Distillation: DMD step with and without EL, and MMD^2"
MIB = 2**20
#: The demo's settings (configs/distillation/digits_dmd*.yaml).
DMD_BATCH = 64
EL_WEIGHT = 0.002
FAKE_UPDATES = 5
CONFIG_LOG_EVERY = 10
GRAD_CLIP = 10.0
EMA_DECAY = 0.98
#: The teacher of configs/distillation/digits_teacher.yaml.
TEACHER_CHANNELS = (32, 64)
TEACHER_LAYERS = 1
IMAGE_CHANNELS = 1
IMAGE_SIZE = 8
KINDS = ("fake", "gen", "gen_norms")
ARMS = ("no_el", "el")
#: Batches per side of part 4 (mmd2, EL); --quick takes the first and the third.
LOSS_BATCHES = (64, 128, 256, 512, 1024)


# --------------------------------------------------------------------------------------------
# Setup: the teacher, the module, the data
# --------------------------------------------------------------------------------------------


def build_teacher(path: str | None, seed: int = 0) -> torch.nn.Module:
    """The digits teacher: from ``path`` (``DiffusionTeacher.save_pretrained``) or random.

    The random one is built exactly as ``DiffusionTeacher`` builds it from the digits teacher
    config: ``EDMPrecond(unet_for_images(1, 8, channels=(32, 64), layers_per_block=1,
    attention=False), sigma_data=0.5, sigma_min=0.002, sigma_max=80)``. Random weights change
    no cost: every step runs the same operations on tensors of the same shapes.
    """
    if path is not None:
        from lightning_losses.modules.teacher import load_teacher

        return load_teacher(path)
    from lightning_losses.diffusion import EDMPrecond, unet_for_images

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = unet_for_images(
            IMAGE_CHANNELS,
            IMAGE_SIZE,
            channels=TEACHER_CHANNELS,
            layers_per_block=TEACHER_LAYERS,
            num_classes=None,
            attention=False,
        )
    return EDMPrecond(unet, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


def make_module(
    teacher: torch.nn.Module, el: bool, device: torch.device, trainer: bool = False
) -> Any:
    """A DMDDistillation with the demo's settings. Without ``trainer`` its steps run through
    ``module.train_step(batch)``: the module's own step without a Trainer (optimizers from
    ``configure_optimizers``, ``loss.backward()``, ``clip_grad_norm_``), what Lightning does on
    one device at 32-bit precision; the Trainer cross-check measures what it adds."""
    from lightning_losses.modules import DMDDistillation

    module = DMDDistillation(
        teacher=teacher,
        el_weight=EL_WEIGHT if el else 0.0,
        el_seed=0,
        fake_updates_per_generator=FAKE_UPDATES,
        grad_clip=GRAD_CLIP,
        fake_grad_clip=GRAD_CLIP,
        ema_decay=EMA_DECAY,
        log_grad_norm_every=0,
    ).to(device)
    if not trainer:
        module.seed_noise(0)  # both arms draw the same noise: EL is all that differs
    return module


def real_batches(
    shape: Sequence[int], batch: int, count: int, device: torch.device, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """``count`` (images, labels) batches, images uniform in [-1, 1] like normalised digits."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.rand(batch, *shape, generator=generator) * 2 - 1
        labels = torch.randint(0, 10, (batch,), generator=generator)
        out.append((images.to(device), labels.to(device)))
    return out


def step_kind(module: Any) -> str:
    """What the module's next training step does: 'fake', 'gen' or 'gen_norms'."""
    if not module.is_generator_step():
        return "fake"
    every = module.log_grad_norm_every
    return "gen_norms" if every and int(module.generator_steps) % every == 0 else "gen"


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --------------------------------------------------------------------------------------------
# Peak memory of one call
# --------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMeter:
    """Growth of peak memory during one call, above the memory in use just before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before (the caching allocator's reserve is not counted). CPU: the
    kernel's peak-RSS mark ``VmHWM``, reset to the current RSS by writing 5 to
    ``/proc/self/clear_refs`` (Linux >= 4.0), minus ``VmRSS`` before. On the CPU the process
    should run with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``, set by
    :func:`run_memory_child`), so that every large buffer is mapped when allocated and unmapped
    when freed; and glibc's ``malloc_trim(0)`` (when there is one) hands the free pages of the
    heap back before each call, so that small buffers the call reuses from earlier calls are
    counted too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda allocator" if device.type == "cuda" else "clear_refs"
        self._malloc_trim = None
        if device.type == "cpu":
            try:
                self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
                self.method += " + malloc_trim"
            except (OSError, AttributeError):
                pass

    def measure(self, fn: Callable[[], object]) -> int:
        """Run ``fn`` once; return its peak growth in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        base_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            # Without the reset the mark also holds earlier peaks: count only growth above them.
            base_kib = max(base_kib, _status_kib("VmHWM"))
            self.method = "no reset (VmHWM not resettable)"
        fn()
        return (_status_kib("VmHWM") - base_kib) * 1024


def dmd_memory(args: argparse.Namespace) -> dict:
    """Peak growth of each kind of training step, per arm (min over the measured steps).

    Per arm: one warm-up cycle of 5 steps with the grad-norm logging on (every kind runs once,
    the AdamW states exist), then cycles with the logging off and on, every step measured.
    """
    device = torch.device(args.device)
    meter = PeakMeter(device)
    teacher = build_teacher(args.teacher)
    cycles = 1 if args.quick else 2
    out: dict[str, dict] = {}
    for arm in ARMS:
        module = make_module(teacher, arm == "el", device)
        batch = real_batches(module.image_shape, args.batch, 1, device)[0]
        growth: dict[str, list[int]] = {kind: [] for kind in KINDS}
        index = 0
        for log, measured in [(1, False)] + [(0, True)] * cycles + [(1, True)] * cycles:
            module.log_grad_norm_every = log
            for _ in range(FAKE_UPDATES):
                kind = step_kind(module)
                used = meter.measure(functools.partial(module.train_step, batch))
                index += 1
                if measured:
                    growth[kind].append(used)
        out[arm] = {kind: min(values) / MIB for kind, values in growth.items()}
    return {"dmd": out, "method": meter.method}


# --------------------------------------------------------------------------------------------
# Part 1: DMD training steps, the arms interleaved
# --------------------------------------------------------------------------------------------


def time_dmd_steps(
    arms: dict[str, Any],
    batches: list[tuple[Tensor, Tensor]],
    cycles: int,
    warmup_cycles: int,
    sync: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """Seconds of every training step, by arm and kind, and per-cycle means.

    A cycle is 5 consecutive training steps of one module (4 fake-only, then the generator step)
    with one logging setting (``log_grad_norm_every`` 0 or 1, set on the module for the cycle).
    Each round runs one cycle of every (arm, logging) pair; the order of the pairs rotates by one
    place each round, so every pair is as often first as last. ``warmup_cycles`` rounds are run
    first and not kept.
    """
    keys = [(arm, log_every) for arm in arms for log_every in (0, 1)]
    samples = {arm: {kind: [] for kind in (*KINDS, "cycle_off", "cycle_norms")} for arm in arms}
    finite = True
    index = 0
    started = time.perf_counter()
    for round_ in range(warmup_cycles + cycles):
        shift = round_ % len(keys)
        for arm, log_every in keys[shift:] + keys[:shift]:
            module = arms[arm]
            module.log_grad_norm_every = log_every
            total = 0.0
            for position in range(FAKE_UPDATES):
                kind = step_kind(module)
                expected = "fake" if position < FAKE_UPDATES - 1 else "gen"
                if not kind.startswith(expected):
                    raise RuntimeError(f"step {position} of a cycle is {kind!r}, not {expected!r}")
                batch = batches[index % len(batches)]
                sync()
                start = time.perf_counter()
                logs = module.train_step(batch)
                sync()
                seconds = time.perf_counter() - start
                index += 1
                total += seconds
                if round_ >= warmup_cycles:
                    samples[arm][kind].append(seconds)
            finite = finite and all(bool(torch.isfinite(v).all()) for v in logs.values())
            if round_ >= warmup_cycles:
                key = "cycle_norms" if log_every else "cycle_off"
                samples[arm][key].append(total / FAKE_UPDATES)
        if round_ + 1 == warmup_cycles or (round_ + 1) % 10 == 0:
            log(f"DMD steps: round {round_ + 1}/{warmup_cycles + cycles}")
    samples["_finite"] = finite  # type: ignore[assignment]
    samples["_seconds"] = time.perf_counter() - started  # type: ignore[assignment]
    return samples


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def derived(s: dict[str, Sequence[float]]) -> dict[str, float]:
    """The figures of a run from one arm's samples (medians of each kind).

    With ``f``, ``g`` and ``n`` the median fake-only, generator (logging off) and generator
    (logging on) steps: the configs' generator step logs the grad norms every 10th time, so it
    costs ``(9 g + n) / 10`` on average; a training step averages ``(4 f + generator) / 5``.
    """
    f, g, n = _median(s["fake"]), _median(s["gen"]), _median(s["gen_norms"])
    gen_config = ((CONFIG_LOG_EVERY - 1) * g + n) / CONFIG_LOG_EVERY
    k = FAKE_UPDATES
    return {
        "fake": f,
        "gen": g,
        "gen_norms": n,
        "gen_config": gen_config,
        "avg_off": ((k - 1) * f + g) / k,
        "avg_config": ((k - 1) * f + gen_config) / k,
        "avg_off_direct": _median(s["cycle_off"]),
    }


def bootstrap_ratios(
    base: dict[str, Sequence[float]],
    other: dict[str, Sequence[float]],
    reps: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals of ``derived(other)[key] / derived(base)[key]``.

    Each arm's samples of each kind are resampled with replacement, independently.
    """
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {}
    kinds = ("fake", "gen", "gen_norms", "cycle_off")
    for _ in range(reps):
        a = {k: rng.choices(base[k], k=len(base[k])) if base[k] else [] for k in kinds}
        b = {k: rng.choices(other[k], k=len(other[k])) if other[k] else [] for k in kinds}
        da, db = derived(a), derived(b)
        for key in da:
            draws.setdefault(key, []).append(db[key] / da[key])
    out = {}
    for key, values in draws.items():
        values.sort()
        out[key] = (values[int(0.025 * reps)], values[max(0, int(0.975 * reps) - 1)])
    return out


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


# --------------------------------------------------------------------------------------------
# Part 3: the same steps through Lightning's Trainer
# --------------------------------------------------------------------------------------------


def trainer_check(
    teacher: torch.nn.Module,
    device: torch.device,
    batch: int,
    cycles: int,
    blocks: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """Seconds per loop iteration of ``Trainer.fit``, by arm and kind (logging off).

    A callback reads the clock at every ``on_train_batch_start``; an iteration is the time to
    the next one (the step, Lightning's optimizer wrappers and result collection, the CSV
    logger's writes every 10 steps, the batch fetch). Each fit runs ``1 + cycles`` cycles of 5
    steps plus one batch that only closes the last iteration; the first cycle (fresh optimizers,
    first calls) is not kept. The arms alternate fit by fit, ``blocks`` fits each; a fit builds
    new AdamW optimizers (``configure_optimizers``), the networks carry on.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sync = make_sync(device)

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.kinds: list[str] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            sync()
            self.starts.append(time.perf_counter())
            self.kinds.append(step_kind(pl_module))

    modules = {arm: make_module(teacher, arm == "el", device, trainer=True) for arm in ARMS}
    shape = modules["no_el"].image_shape
    steps = FAKE_UPDATES * (1 + cycles) + 1
    data = real_batches(shape, batch, steps, torch.device("cpu"), seed=1)
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    samples = {arm: {"fake": [], "gen": [], "gen_norms": [], "cycle_off": []} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in range(blocks):
            for arm in ARMS if block % 2 == 0 else ARMS[::-1]:
                clock = StepClock()
                settings = {
                    **QUIET_TRAINER,
                    "accelerator": device.type,
                    "logger": CSVLogger(tmp, name=arm),
                }
                trainer = L.Trainer(
                    **settings,
                    max_epochs=1,
                    log_every_n_steps=CONFIG_LOG_EVERY,
                    limit_val_batches=0,
                    callbacks=[clock],
                )
                loader = DataLoader(dataset, batch_size=batch, shuffle=False)
                trainer.fit(modules[arm], train_dataloaders=loader)
                times = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
                kept = range(FAKE_UPDATES, FAKE_UPDATES * (1 + cycles))
                for i in kept:
                    samples[arm][clock.kinds[i]].append(times[i])
                for c in range(1, 1 + cycles):
                    cycle = times[c * FAKE_UPDATES : (c + 1) * FAKE_UPDATES]
                    samples[arm]["cycle_off"].append(sum(cycle) / FAKE_UPDATES)
                log(f"Trainer check: block {block + 1}/{blocks}, {arm} done")
    return samples


# --------------------------------------------------------------------------------------------
# Part 4: mmd2 and the EL, forward+backward
# --------------------------------------------------------------------------------------------


def bank_feature_dims(channels: int) -> list[int]:
    from lightning_losses.nets.embedders import RandomEmbedderBank

    return list(RandomEmbedderBank(channels).feature_dims)


def loss_forms(
    batch: int,
    dims: Sequence[int],
    image_shape: Sequence[int],
    device: torch.device,
    only: str | None = None,
    seed: int = 0,
) -> dict[str, Callable[[], Tensor]]:
    """Zero-argument forward+backward calls at ``batch`` rows per side.

    ``mmd2 d=D``: ``mmd2(x, y)`` with its defaults (Gaussian kernel, median bandwidth, 5
    multipliers, unbiased), x (B, D) N(0, 1) with gradient, y (B, D) without. ``EL``:
    ``EmbeddingLoss(RandomEmbedderBank(C))`` (the distillation module's default EL, 4 random
    networks, seed 0) between generated (B, C, H, W) images with gradient and real ones, both
    uniform in [-1, 1]. ``only`` builds that form alone (memory runs).
    """
    from lightning_losses.losses import EmbeddingLoss, mmd2
    from lightning_losses.nets.embedders import RandomEmbedderBank

    generator = torch.Generator().manual_seed(seed)
    forms: dict[str, Callable[[], Tensor]] = {}

    def mmd_call(x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        def call() -> Tensor:
            x.grad = None
            loss = mmd2(x, y)
            loss.backward()
            return loss.detach()

        return call

    for dim in dims:
        name = f"mmd2 d={dim}"
        if only not in (None, name):
            continue
        x = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
        y = torch.randn(batch, dim, generator=generator).to(device)
        forms[name] = mmd_call(x, y)
    if only in (None, "EL"):
        el = EmbeddingLoss(RandomEmbedderBank(int(image_shape[0]), seed=0)).to(device)
        fake = (torch.rand(batch, *image_shape, generator=generator) * 2 - 1).to(device)
        fake.requires_grad_()
        real = (torch.rand(batch, *image_shape, generator=generator) * 2 - 1).to(device)

        def el_call() -> Tensor:
            fake.grad = None
            loss = el(fake, real).loss
            loss.backward()
            return loss.detach()

        forms["EL"] = el_call
    return forms


def time_forms(
    forms: dict[str, Callable[[], Tensor]],
    budget_s: float,
    min_reps: int,
    max_reps: int,
    sync: Callable[[], None],
) -> dict[str, dict]:
    """Median and minimum seconds per call of each form, their calls interleaved.

    Warm-up: 3 calls (1 when the first takes 1 s or more). Each form then gets
    ``clamp(budget_s / fastest warm-up call, min_reps, max_reps)`` timed calls (at least 10 when
    a call takes under 0.5 s), spread evenly through one schedule of all the forms' calls, so a
    slow spell of the shared machine hits every form alike.
    """
    counts: dict[str, int] = {}
    out: dict[str, dict] = {}
    for name, call in forms.items():
        fastest = math.inf
        for i in range(3):
            sync()
            start = time.perf_counter()
            loss = call()
            sync()
            fastest = min(fastest, time.perf_counter() - start)
            if i == 0 and fastest >= 1.0:
                break
        floor = max(min_reps, 10) if fastest < 0.5 else min_reps
        counts[name] = max(floor, min(max_reps, int(budget_s / max(fastest, 1e-6))))
        out[name] = {"times": [], "finite": bool(torch.isfinite(loss))}
    schedule = sorted(((i + 0.5) / n, name) for name, n in counts.items() for i in range(n))
    for _, name in schedule:
        sync()
        start = time.perf_counter()
        forms[name]()
        sync()
        out[name]["times"].append(time.perf_counter() - start)
    for result in out.values():
        result["median_s"] = statistics.median(result["times"])
        result["min_s"] = min(result["times"])
        result["reps"] = len(result["times"])
    return out


def loss_memory(args: argparse.Namespace) -> dict:
    """Peak growth of one forward+backward of every (form, B): the smallest of 3 calls (1 when
    the warm-up call took 2 s or more), after one warm-up call; inputs are not counted."""
    device = torch.device(args.device)
    meter = PeakMeter(device)
    sync = make_sync(device)
    dims, batches = loss_grid(args)
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        for name in [f"mmd2 d={d}" for d in dims] + ["EL"]:
            call = loss_forms(batch, dims, (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), device, name)[
                name
            ]
            sync()
            start = time.perf_counter()
            call()
            sync()
            repeats = 3 if time.perf_counter() - start < 2.0 else 1
            growth = min(meter.measure(call) for _ in range(repeats))
            out.setdefault(str(batch), {})[name] = growth / MIB
            del call
    return {"loss": out, "method": meter.method}


def loss_grid(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """(feature dims, batches) of part 4: the bank's distinct stage widths, B = 64 ... 1024."""
    dims = sorted(set(bank_feature_dims(IMAGE_CHANNELS)))
    batches = list(LOSS_BATCHES)
    if args.quick:
        dims, batches = [dims[0], dims[-1]], [batches[0], batches[2]]
    if args.loss_batches:
        batches = list(args.loss_batches)
    if args.loss_dims:
        dims = list(args.loss_dims)
    return dims, batches


# --------------------------------------------------------------------------------------------
# Memory runs in a child process (CPU)
# --------------------------------------------------------------------------------------------


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--memory-child"]
    argv += ["--threads", str(args.threads), "--device", args.device, "--batch", str(args.batch)]
    if args.quick:
        argv.append("--quick")
    if args.teacher:
        argv += ["--teacher", args.teacher]
    if args.loss_batches:
        argv += ["--loss-batches", *map(str, args.loss_batches)]
    if args.loss_dims:
        argv += ["--loss-dims", *map(str, args.loss_dims)]
    return argv


def all_memory(args: argparse.Namespace) -> dict:
    """Parts 2 and 4's memory: ``dmd_memory`` then ``loss_memory``, in this process."""
    dmd = dmd_memory(args)
    loss = loss_memory(args)
    return {"dmd": dmd["dmd"], "loss": loss["loss"], "method": dmd["method"]}


def run_memory_child(args: argparse.Namespace) -> dict:
    """:func:`all_memory` in a fresh process on the CPU (in this process on CUDA).

    The child starts with glibc's mmap and trim thresholds fixed at 128 KiB, which only takes
    effect at process start: this is why it is a child.
    """
    if args.device == "cuda":
        return all_memory(args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(child_argv(args), capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {result.returncode}: {tail}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                cpu,
            )
    except OSError:
        pass
    where = "the CPU"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), shared with other jobs; torch {torch.__version__} on "
        f"{where}, torch.set_num_threads({torch.get_num_threads()}), Python "
        f"{platform.python_version()}"
    )


def _ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(value: float, ci: tuple[float, float] | None = None) -> str:
    text = f"**{value:.3f}**" if math.isfinite(value) else "-"
    if ci is not None and math.isfinite(value):
        text += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return text


def step_tables(
    samples: dict, bootstrap_reps: int
) -> tuple[str, dict[str, float], dict[str, tuple[float, float]], dict[str, dict[str, float]]]:
    """The per-kind and the per-run tables of part 1; also the ratios EL / no EL, their
    intervals and each arm's :func:`derived` figures."""
    a, b = samples["no_el"], samples["el"]
    da, db = derived(a), derived(b)
    ci = bootstrap_ratios(a, b, reps=bootstrap_reps)
    names = {
        "fake": "fake-only (4 steps in 5)",
        "gen": "generator + fake, grad-norm logging off",
        "gen_norms": "generator + fake, with the grad-norm logging",
    }
    lines = [
        "| training step | no EL: median ms (IQR) | EL: median ms (IQR) | EL / no EL "
        "(95% bootstrap) | steps timed, no EL / EL |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in names.items():
        lines.append(
            f"| {label} | {_ms(da[kind])} ({_ms(_iqr(a[kind]))}) "
            f"| {_ms(db[kind])} ({_ms(_iqr(b[kind]))}) "
            f"| {_ratio(db[kind] / da[kind], ci[kind])} | {len(a[kind])} / {len(b[kind])} |"
        )
    lines += [
        "",
        "| per run | grad-norm logging | no EL (ms) | EL (ms) | EL / no EL (95% bootstrap) |",
        "|---|---|---:|---:|---:|",
    ]
    rows = [
        ("generator step", "off (`log_grad_norm_every=0`)", "gen"),
        ("generator step", "configs' (every 10th): (9 g + g_log) / 10", "gen_config"),
        ("averaged training step (4 f + g) / 5", "off", "avg_off"),
        ("averaged training step (4 f + g) / 5", "configs' (every 10th)", "avg_config"),
        ("averaged training step, direct: median of cycle time / 5", "off", "avg_off_direct"),
    ]
    ratios = {}
    for label, logging_label, key in rows:
        ratios[key] = db[key] / da[key]
        lines.append(
            f"| {label} | {logging_label} | {_ms(da[key])} | {_ms(db[key])} "
            f"| {_ratio(ratios[key], ci[key])} |"
        )
    return "\n".join(lines), ratios, ci, {"no_el": da, "el": db}


def memory_table(result: dict) -> str:
    if "error" in result:
        return f"Peak memory: the measuring process failed ({result['error']})."
    dmd = result["dmd"]
    names = {
        "fake": "fake-only",
        "gen": "generator + fake, logging off",
        "gen_norms": "generator + fake, with the grad-norm logging",
    }
    lines = [
        "| training step | no EL: peak MiB | EL: peak MiB | EL - no EL (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in names.items():
        lo, hi = dmd["no_el"][kind], dmd["el"][kind]
        lines.append(f"| {label} | {_mib(lo)} | {_mib(hi)} | {hi - lo:+,.1f} |")
    if result.get("method", "").startswith("clear_refs"):
        lines += [
            "",
            "The fake-only step runs the same code in both arms (EL is not touched): its "
            "difference shows the resolution of the RSS method (malloc's reuse of small "
            "buffers).",
        ]
    return "\n".join(lines)


def trainer_table(samples: dict, manual: dict[str, dict[str, float]], reps: int) -> str:
    a, b = samples["no_el"], samples["el"]
    da, db = derived(a), derived(b)
    ci = bootstrap_ratios(a, b, reps=reps)
    lines = [
        "| loop iteration in `Trainer.fit` (logging off) | no EL (ms) | EL (ms) "
        "| EL / no EL (95% bootstrap) | Trainer minus manual loop, no EL / EL (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("fake-only, median", "fake"),
        ("generator + fake, median", "gen"),
        ("averaged training step (4 f + g) / 5", "avg_off"),
        ("averaged training step, direct: median of cycle time / 5", "avg_off_direct"),
    ]
    for label, key in rows:
        extra = f"{_ms(da[key] - manual['no_el'][key])} / {_ms(db[key] - manual['el'][key])}"
        lines.append(
            f"| {label} | {_ms(da[key])} | {_ms(db[key])} "
            f"| {_ratio(db[key] / da[key], ci[key])} | {extra} |"
        )
    lines.append(
        f"| iterations kept, no EL / EL | {len(a['fake']) + len(a['gen'])} "
        f"| {len(b['fake']) + len(b['gen'])} | | |"
    )
    return "\n".join(lines)


def loss_tables(
    timing: dict[int, dict],
    memory: dict,
    dims: Sequence[int],
    feature_dims: Sequence[int],
) -> str:
    """Part 4's time and memory tables. When every width of ``feature_dims`` (the bank's maps)
    was timed, two more columns split the EL: the sum of the medians of the mmd2 at those widths
    (the 10 MMDs of the EL) and the rest (the bank's forward on 2B images, its backward, the
    checks)."""
    names = [f"mmd2 d={d}" for d in dims] + ["EL"]
    head = " | ".join(names)
    split = all(f"mmd2 d={d}" in names for d in feature_dims)
    extra = " | EL's mmd2s, summed | EL minus them |" if split else " |"
    lines = [
        f"| B per side | {head}{extra}",
        "|---:|" + "---:|" * (len(names) + (2 if split else 0)),
    ]
    for batch, result in timing.items():
        cells = [f"{_ms(result[n]['median_s'])} ({_ms(result[n]['min_s'])})" for n in names]
        if split:
            mmds = sum(result[f"mmd2 d={d}"]["median_s"] for d in feature_dims)
            cells += [_ms(mmds), _ms(result["EL"]["median_s"] - mmds)]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Peak memory growth of one forward+backward (MiB); for mmd2 also in units of one (2B)² "
        "float32 matrix (the pooled kernel matrix):",
        "",
        f"| B per side | {head} |",
        "|---:|" + "---:|" * len(names),
    ]
    if "error" in memory:
        lines.append(f"| measuring process failed: {memory['error']} |" + " |" * len(names))
    else:
        for batch in timing:
            row = memory["loss"].get(str(batch), {})
            unit = (2 * batch) ** 2 * 4 / MIB
            cells = [
                "-"
                if n not in row
                else _mib(row[n])
                if n == "EL"
                else f"{_mib(row[n])} ({row[n] / unit:.1f})"
                for n in names
            ]
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(ratios: dict[str, float], ci: dict[str, tuple[float, float]]) -> list[str]:
    """The issue's goal (EL adds at most 15%), judged on the medians, with the intervals."""

    def judged(key: str) -> str:
        r, (lo, hi) = ratios[key], ci[key]
        word = "met" if r <= 1.15 else "not met"
        if lo <= 1.15 < hi:
            word += ", the interval straddles +15%"
        return f"{r - 1:+.1%} ({lo - 1:+.1%} to {hi - 1:+.1%}; {word})"

    return [
        "- Issue's goal, EL adds at most 15% to a DMD step's time at the demo's size: averaged "
        f"training step with the configs' logging {judged('avg_config')}, with the logging off "
        f"{judged('avg_off')}. The generator step alone (where EL runs, 1 training step in 5): "
        f"{judged('gen')} with the logging off, {judged('gen_config')} with the configs' "
        "logging.",
    ]


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small sizes (< 1 min)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the demo configs run with OMP_NUM_THREADS=1, and on 2 "
        "shared cores one thread is faster for this tiny UNet and less disturbed by other jobs)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    parser.add_argument("--teacher", help="a teacher folder (save_pretrained); default: random")
    parser.add_argument("--batch", type=int, default=DMD_BATCH, help="DMD batch (the demo's 64)")
    parser.add_argument("--cycles", type=int, help="timed 5-step cycles per arm and logging")
    parser.add_argument("--trainer-cycles", type=int, help="timed cycles per Trainer fit")
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer cross-check")
    parser.add_argument("--loss-batches", type=int, nargs="+", help="B of part 4")
    parser.add_argument("--loss-dims", type=int, nargs="+", help="feature dims of part 4")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "batch", "cycles", "trainer_cycles"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.batch < 2:
        parser.error("--batch must be >= 2 (the unbiased MMD needs 2 samples a side)")
    for name in ("loss_batches", "loss_dims"):
        values = getattr(args, name) or []
        if any(v < 2 for v in values):
            parser.error(f"--{name.replace('_', '-')} values must be >= 2, got {values}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; return the markdown (also printed, and written to ``--out``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(all_memory(args)))
        return ""

    device = torch.device(args.device)
    sync = make_sync(device)
    command = shlex.join(["python", "benchmarks/distillation.py", *(argv or sys.argv[1:])])
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    if args.quick:
        cycles, trainer_cycles, blocks = 1, 1, 1
        budget_s, min_reps, max_reps, boot = 0.3, 3, 10, 300
    else:
        cycles, trainer_cycles, blocks = 20, 4, 4
        budget_s, min_reps, max_reps, boot = 2.0, 3, 30, 1000
    cycles = args.cycles or cycles
    trainer_cycles = args.trainer_cycles or trainer_cycles
    load = [os.getloadavg()[0]]
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    # Part 1: DMD steps.
    teacher = build_teacher(args.teacher)
    arms = {arm: make_module(teacher, arm == "el", device) for arm in ARMS}
    shape = arms["no_el"].image_shape
    batches = real_batches(shape, args.batch, 4, device)
    samples = time_dmd_steps(arms, batches, cycles, 1, sync, log)
    del arms
    step_text, ratios, ratio_ci, manual = step_tables(samples, boot)
    log(f"DMD steps done: averaged step EL / no EL {ratios['avg_config']:.3f} (configs' logging)")
    load.append(os.getloadavg()[0])

    # Part 3: Trainer cross-check.
    trainer_text = ""
    if not args.no_trainer:
        trainer_samples = trainer_check(teacher, device, args.batch, trainer_cycles, blocks, log)
        trainer_text = trainer_table(trainer_samples, manual, boot)
    load.append(os.getloadavg()[0])

    # Part 4: mmd2 and the EL.
    dims, loss_batches = loss_grid(args)
    timing: dict[int, dict] = {}
    for batch in loss_batches:
        forms = loss_forms(batch, dims, (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), device)
        timing[batch] = time_forms(forms, budget_s, min_reps, max_reps, sync)
        log(
            f"losses B={batch}: "
            + ", ".join(f"{k} {v['median_s'] * 1e3:.3g} ms" for k, v in timing[batch].items())
        )
    load.append(os.getloadavg()[0])
    # Part 2 and part 4's memory, in a fresh process.
    memory = {"error": "not run (--no-memory)"} if args.no_memory else run_memory_child(args)
    log(f"memory: {memory}")
    load.append(os.getloadavg()[0])
    total_s = time.perf_counter() - started

    feature_dims = bank_feature_dims(IMAGE_CHANNELS)
    finite_losses = all(r["finite"] for t in timing.values() for r in t.values())
    teacher_text = (
        f"the teacher in `{args.teacher}`"
        if args.teacher
        else "a random-weight digits teacher (UNet channels [32, 64], 1 layer per block, no "
        "attention, 1 x 8 x 8, EDM preconditioning; built as `DiffusionTeacher` builds it)"
    )
    el_64 = timing.get(64, {}).get("EL")
    el_share = ""
    if el_64 is not None:
        el_share = (
            f" EL alone at B=64 (part 4, median {_ms(el_64['median_s'])} ms) is "
            f"{el_64['median_s'] / manual['no_el']['gen']:.1%} of the no-EL generator step and "
            f"{el_64['median_s'] / FAKE_UPDATES / manual['no_el']['avg_off']:.1%} of the "
            "averaged training step (it runs once per 5 steps)."
        )
    mem_method = memory.get("method", "-")
    fake_ratio = manual["el"]["fake"] / manual["no_el"]["fake"]
    out = [
        HEADING,
        "",
        f"Made by `benchmarks/distillation.py`. Command: `{command}`  ",
        f"Date: {stamp}  ",
        f"Machine: {machine(device)}  ",
        f"1-min load average (other jobs included): {', '.join(f'{v:.1f}' for v in load)} at the "
        f"start and after the DMD steps, the Trainer check, the loss timings and the memory "
        f"runs. Whole run: {total_s / 60:.1f} min.",
        "",
        "### DMD training step with and without EL (the digits demo's size)",
        "",
        f"{teacher_text}; `DMDDistillation` as in `configs/distillation/digits_dmd*.yaml`: batch "
        f"{args.batch}, `fake_updates_per_generator=5`, AdamW lr 1e-4 (both networks), gradients "
        f"clipped at norm 10, EMA 0.98, `el_weight` 0 against {EL_WEIGHT:g} (EL = "
        "`EmbeddingLoss(RandomEmbedderBank(1))`, 4 random networks, 10 feature maps). Real "
        f"batches: random images in [-1, 1]. float32 on {device.type}.",
        "",
        "How it is measured: a manual loop calls the module's own `train_step` without a "
        "Trainer (the generator sampling, the DMD loss, EL, backward, clipping, AdamW, EMA and "
        "the fake update are the module's code; without a Trainer it uses `loss.backward()` and "
        "`clip_grad_norm_`, what Lightning does on one device in 32-bit precision, and returns "
        "the logs instead of logging them; the Trainer cross-check below measures what "
        "Lightning adds). The two modules start from the same weights and draw the same "
        "noise. Cycles of 5 steps (4 fake-only, then the generator step) of each (arm, logging) "
        f"pair are interleaved, the order rotating every round: 1 warm-up round, then {cycles} "
        "rounds. The grad-norm logging (`output_grad_norms`: `autograd.grad` of the DMD loss and "
        "of EL back to the generated images) is timed with `log_grad_norm_every=1` in its cycles "
        "and 0 in the others; the configs' every-10th setting is combined from the two. "
        f"Intervals: percentile bootstrap of the ratio of medians, {boot} resamples of each "
        "arm's steps.",
        "",
        step_text,
        "",
        f"- All logged losses finite: {samples['_finite']}. Part 1 took "
        f"{samples['_seconds']:.0f} s.{el_share}",
        f"- The fake-only steps run the same code in both arms (EL is not touched): their ratio, "
        f"{fake_ratio:.3f} ({ratio_ci['fake'][0]:.3f}-{ratio_ci['fake'][1]:.3f}), is a measure "
        "of this run's timing noise and of any bias between the arms.",
        *verdict(ratios, ratio_ci),
        "",
        "Peak memory growth of one training step above the memory in use before it (MiB; "
        "smallest over the steps measured: after one warm-up cycle, "
        f"{1 if args.quick else 2} cycle(s) with the logging off and as many with it on, per "
        f"arm; {'a fresh process, ' if device.type == 'cpu' else ''}method: {mem_method}):",
        "",
        memory_table(memory),
        "",
    ]
    if trainer_text:
        out += [
            "### Cross-check through Lightning's Trainer",
            "",
            f"`Trainer.fit` (max_epochs 1, CSVLogger, `log_every_n_steps=10`, no progress bar or "
            f"checkpointing) of `DMDDistillation` itself, logging off; per fit 1 warm-up cycle "
            f"(fresh AdamW) + {trainer_cycles} timed cycles, {blocks} fit(s) per arm, the arms "
            "alternating fit by fit (ABBA...). An iteration is the time between consecutive "
            "`on_train_batch_start` calls. The fits run one after the other, so a change of the "
            "machine's load from one fit to the next moves this ratio, which the manual loop's "
            "step-by-step interleaving avoids: the fake-only row, identical code in both arms, "
            "shows how much. The manual loop's ratios are the figures to use; this table shows "
            "that the Trainer adds little per step.",
            "",
            trainer_text,
            "",
        ]
    unit_text = (
        "CPU: growth of peak RSS in a fresh process (glibc mmap threshold 128 KiB; "
        "`malloc_trim(0)` and a VmHWM reset before each call)"
    )
    if device.type == "cuda":
        unit_text = "CUDA allocator: max_memory_allocated after reset, minus memory allocated"
    out += [
        "### mmd2 and EL, forward+backward",
        "",
        f"`mmd2(x, y)` with its defaults (Gaussian, median bandwidth, 5 multipliers, unbiased) on "
        f"x, y of B x d (x with gradient), at the stage widths of `RandomEmbedderBank` (its 10 "
        f"feature maps: {feature_dims}); `EL` = `EmbeddingLoss(RandomEmbedderBank(1))` on B "
        "generated (with gradient) and B real 1 x 8 x 8 images (the bank's forward on both "
        "batches, 10 mmd2, backward to the images). Time: ms per call, median (min); warm-up 3 "
        f"calls (1 when a call takes >= 1 s), then budget {budget_s:g} s / call time calls, "
        f"clamped to [{min_reps}, {max_reps}] (at least 10 under 0.5 s), the forms of one B "
        f"interleaved. Memory: {unit_text}; smallest of 3 calls (1 when a call takes >= 2 s). "
        f"All losses finite: {finite_losses}.",
        "",
        loss_tables(timing, memory, dims, feature_dims),
        "",
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
