"""Time to fit a post-hoc calibrator on cached logits, and the authors' LBFGS recipe, on the CPU.

1. Temperature scaling with ``fit_temperature`` (LBFGS with a strong-Wolfe line search on log T,
   float64, at most 100 iterations): seconds per fit (median of repeats) and per NLL evaluation
   (one forward and backward over all N x C logits; LBFGS evaluates several per iteration).
2. ``CorrectnessAwareCalibrator`` (k = 4, 5 hidden units) trained with the CA loss: 1000 Adam
   steps (lr 1e-3) on shuffled mini-batches of 1000 rows of the cached logits and of the V = 3
   views' logits, in a plain loop (no Lightning, no DataLoader): seconds per fit and per step.
3. The authors' temperature scaling: ``torch.optim.LBFGS(lr=0.01, max_iter=50)`` without a line
   search, on T itself (initialised at 1.5, float32), one ``step`` as in their code, against
   ``fit_temperature``, on the same data, whose logits are planted to be over-confident by
   T = 2.5: the temperature each returns and its NLL.

The data are synthetic "cached logits" (no classifier runs): true logits ``u = randn(N, C) +
(log C + 1) * onehot(k)`` for a random class k per row, labels drawn from ``softmax(u)`` (so the
argmax is right about 60% of the time), classifier logits ``z0 = 2.5 u`` (their NLL-optimal
temperature is 2.5 up to sampling noise) and view logits ``2.5 (u + 0.5 randn)``.

Grid: N in {10k, 50k} x C in {10, 1000}; ``--quick``: N = 10k only, 200 Adam steps, fewer repeats.

Usage (from the repository root, with the project's virtual environment active)::

    python benchmarks/calibration_fit.py            # about 6 minutes on a shared 2-core machine
    python benchmarks/calibration_fit.py --quick    # under a minute

Prints markdown tables preceded by the command, the date and the machine; writes no file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.losses import correctness_aware_loss
from lightning_losses.nets import CorrectnessAwareCalibrator, TemperatureScaling, fit_temperature
from lightning_losses.nets.calibrator_fit import fit_calibrator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine, markdown_table, publish  # noqa: E402

PLANTED_T = 2.5
NUM_VIEWS = 3
VIEW_NOISE = 0.5
INIT_T = 1.5


@dataclass
class CachedLogits:
    logits: Tensor  # (N, C) float32: the classifier's logits of the original inputs
    view_logits: Tensor  # (V, N, C) float32: the logits of the V transformed views
    labels: Tensor  # (N,) int64

    @property
    def accuracy(self) -> float:
        return (self.logits.argmax(dim=1) == self.labels).double().mean().item()


def make_cached_logits(n: int, num_classes: int, seed: int = 0) -> CachedLogits:
    """Synthetic cached logits over-confident by PLANTED_T (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, num_classes, generator=generator)
    rows = torch.arange(n)
    likely = torch.randint(0, num_classes, (n,), generator=generator)
    true_logits[rows, likely] += math.log(num_classes) + 1.0
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator).squeeze(1)
    view_logits = torch.empty(NUM_VIEWS, n, num_classes)
    for view in range(NUM_VIEWS):
        noise = torch.randn(n, num_classes, generator=generator)
        view_logits[view] = PLANTED_T * (true_logits + VIEW_NOISE * noise)
    return CachedLogits(PLANTED_T * true_logits, view_logits, labels)


def nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean NLL of ``logits / temperature`` in float64."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------------------------
# 1. Temperature scaling with fit_temperature
# --------------------------------------------------------------------------------------------


def strong_wolfe_counts(logits: Tensor, labels: Tensor) -> tuple[int, int, float]:
    """``(iterations, NLL evaluations, T)`` of the fit that ``fit_temperature`` runs.

    ``fit_temperature`` keeps its optimizer to itself, so this repeats its documented recipe
    (LBFGS lr 1 with strong-Wolfe on ``TemperatureScaling.log_temperature``, float64, at most
    100 iterations, from T = 1.5) and reads the counters LBFGS keeps in its state. The caller
    checks that both fits reach the same T.
    """
    z = logits.double()
    model = TemperatureScaling(INIT_T).double()
    param = model.log_temperature
    optimizer = torch.optim.LBFGS([param], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(z), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[param]
    return int(state["n_iter"]), int(state["func_evals"]), model.scalar_temperature().item()


def bench_temperature_scaling(data: CachedLogits, repeats: int) -> dict:
    seconds = []
    temperature = math.nan
    for _ in range(repeats):
        elapsed, model = timed(lambda: fit_temperature(data.logits, data.labels))
        seconds.append(elapsed)
        temperature = model.scalar_temperature().item()
    iterations, evaluations, replica_t = strong_wolfe_counts(data.logits, data.labels)
    if abs(replica_t - temperature) > 1e-4:
        raise RuntimeError(
            f"the counting replica of fit_temperature reached T = {replica_t:.6f}, "
            f"fit_temperature T = {temperature:.6f}: the counts would not describe its fit"
        )
    fit_s = statistics.median(seconds)
    return {
        "fit_s": fit_s,
        "iterations": iterations,
        "evaluations": evaluations,
        "eval_ms": 1e3 * fit_s / evaluations,
        "t": temperature,
        "nll": nll(data.logits, data.labels, temperature),
    }


# --------------------------------------------------------------------------------------------
# 2. The CA calibrator, trained with the CA loss
# --------------------------------------------------------------------------------------------


def train_ca_calibrator(
    data: CachedLogits, steps: int, batch_size: int, seed: int = 0
) -> tuple[float, float, CorrectnessAwareCalibrator]:
    """``(seconds, last loss, calibrator)`` of ``steps`` Adam steps on shuffled mini-batches."""
    torch.manual_seed(seed)
    calibrator = CorrectnessAwareCalibrator(num_views=NUM_VIEWS, top_k=4, hidden=5)
    optimizer = torch.optim.Adam(calibrator.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    n = data.labels.shape[0]
    batch_size = min(batch_size, n)
    order, position = torch.randperm(n, generator=generator), 0
    loss = torch.tensor(math.nan)
    start = time.perf_counter()
    for _ in range(steps):
        if position + batch_size > n:  # a new epoch: reshuffle, drop the incomplete batch
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        optimizer.zero_grad(set_to_none=True)
        calibrated = calibrator(data.logits[index], data.view_logits[:, index])
        loss = correctness_aware_loss(calibrated, data.labels[index]).loss
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, loss.item(), calibrator


def bench_ca_calibrator(data: CachedLogits, steps: int, batch_size: int) -> dict:
    train_ca_calibrator(data, steps=min(20, steps), batch_size=batch_size)  # warm-up
    seconds, last_loss, calibrator = train_ca_calibrator(data, steps, batch_size)
    with torch.no_grad():
        sample = slice(0, min(10_000, data.labels.shape[0]))
        t = calibrator.temperature(data.logits[sample], data.view_logits[:, sample])
    return {
        "fit_s": seconds,
        "step_ms": 1e3 * seconds / steps,
        "loss": last_loss,
        "median_t": t.median().item(),
    }


# --------------------------------------------------------------------------------------------
# 3. The authors' recipe: LBFGS on T without a line search
# --------------------------------------------------------------------------------------------


def fit_temperature_authors(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """``(T, NLL evaluations)`` of LBFGS(lr=0.01, max_iter=50) on T, no line search, one step."""
    temperature = nn.Parameter(torch.ones(1) * INIT_T)
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return temperature.item(), int(optimizer.state[temperature]["func_evals"])


def bench_authors(data: CachedLogits) -> dict:
    """One fit: it always runs its 50 iterations, and the T it returns is the point."""
    elapsed, (temperature, evaluations) = timed(
        lambda: fit_temperature_authors(data.logits, data.labels)
    )
    return {
        "fit_s": elapsed,
        "evaluations": evaluations,
        "t": temperature,
        "nll": nll(data.logits, data.labels, temperature),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def speed_table(rows: list[dict], steps: int, batch_size: int) -> str:
    headers = [
        "N",
        "C",
        "TS `fit_temperature`: s / fit",
        "LBFGS iterations",
        "NLL evaluations",
        "ms / evaluation",
        f"CA calibrator: s / fit ({steps} Adam steps, batch {batch_size})",
        "ms / step",
    ]
    cells = [
        [
            f"{row['n']:,}",
            f"{row['c']:,}",
            _seconds(row["ts"]["fit_s"]),
            row["ts"]["iterations"],
            row["ts"]["evaluations"],
            f"{row['ts']['eval_ms']:.1f}",
            _seconds(row["ca"]["fit_s"]),
            f"{row['ca']['step_ms']:.2f}",
        ]
        for row in rows
    ]
    return markdown_table(headers, cells).rstrip("\n")


def planted_table(rows: list[dict]) -> str:
    headers = [
        "N",
        "C",
        "accuracy",
        "planted T",
        "strong-Wolfe T",
        "its NLL",
        "s / fit",
        "authors' LBFGS T",
        "its NLL",
        "s / fit",
        "their NLL evaluations",
    ]
    cells = []
    for row in rows:
        ts, authors = row["ts"], row["authors"]
        cells.append(
            [
                f"{row['n']:,}",
                f"{row['c']:,}",
                f"{row['accuracy']:.3f}",
                PLANTED_T,
                f"{ts['t']:.3f}",
                f"{ts['nll']:.4f}",
                _seconds(ts["fit_s"]),
                f"{authors['t']:.3f}",
                f"{authors['nll']:.4f}",
                _seconds(authors["fit_s"]),
                authors["evaluations"],
            ]
        )
    return markdown_table(headers, cells).rstrip("\n")


# --------------------------------------------------------------------------------------------
# 4. Issue 12.3: the CA fit with its inputs computed once, against every step
# --------------------------------------------------------------------------------------------


def _ca_fit(data: CachedLogits, steps: int, batch_size: int, precompute: bool) -> tuple:
    torch.manual_seed(0)
    dtype = data.logits.dtype
    calibrator = CorrectnessAwareCalibrator(num_views=NUM_VIEWS, top_k=4, hidden=5).to(dtype)
    epochs = math.ceil(steps * batch_size / data.labels.shape[0]) + 1
    cpu_start = time.process_time()
    elapsed, history = timed(
        lambda: fit_calibrator(
            calibrator,
            data.logits,
            data.labels,
            data.view_logits,
            epochs=epochs,
            batch_size=batch_size,
            lr=1e-3,
            max_steps=steps,
            drop_last=True,
            precompute=precompute,
        )
    )
    cpu = time.process_time() - cpu_start
    with torch.no_grad():
        t = calibrator.temperature(*_sample(data))
    return elapsed, history, t, calibrator, cpu


def _sample(data: CachedLogits) -> tuple[Tensor, Tensor]:
    """The logits and views of the first 10,000 rows (where T is compared)."""
    sample = slice(0, min(10_000, data.labels.shape[0]))
    return data.logits[sample], data.view_logits[:, sample]


def _difference(a: Tensor, b: Tensor) -> str:
    a, b = a.double(), b.double()
    absolute = (a - b).abs().max().item()
    relative = ((a - b).abs() / b.abs()).max().item()
    return f"{absolute:.1e} (relative {relative:.1e})"


def _as_float64(data: CachedLogits) -> CachedLogits:
    return CachedLogits(data.logits.double(), data.view_logits.double(), data.labels)


def ca_speedup(n: int, c: int, steps: int, batch_size: int, seed: int) -> str:
    """Old benchmark loop, ``fit_calibrator(precompute=False)`` and ``(precompute=True)``: the
    same Adam steps; the last two in the same batch order, compared. The fast fit runs before
    and after the slow ones (the mean is reported), so a change of load hits both sides. Then
    the fast fit in float64 on the same (float32-valued) data: the float64 truth both float32
    fits are measured against."""
    warm = make_cached_logits(2000, c, seed=seed)  # one-off costs out of the timings
    for precompute in (True, False):
        _ca_fit(warm, 20, batch_size, precompute=precompute)
    train_ca_calibrator(warm, 20, batch_size)
    data = make_cached_logits(n, c, seed=seed)
    new_a, new_hist, new_t, new_cal, new_a_cpu = _ca_fit(data, steps, batch_size, True)
    old_cpu = time.process_time()
    old_s, old_loss, _ = train_ca_calibrator(data, steps, batch_size)
    old_cpu = time.process_time() - old_cpu
    ref_s, ref_hist, ref_t, ref_cal, ref_cpu = _ca_fit(data, steps, batch_size, False)
    new_b, _, new_t_again, _, new_b_cpu = _ca_fit(data, steps, batch_size, True)
    one_step_s = _ca_fit(data, 1, batch_size, precompute=True)[0]
    if not torch.equal(new_t, new_t_again):
        raise RuntimeError("two precomputed fits with the same seed differ")
    new_s, new_cpu = (new_a + new_b) / 2, (new_a_cpu + new_b_cpu) / 2
    # The float64 truth at full size: the precomputed fit in float64 (it equals the float64
    # per-step reference to rounding: the smaller check below).
    data64 = _as_float64(data)
    del data
    truth_s, truth_hist, truth_t, _, _ = _ca_fit(data64, steps, batch_size, precompute=True)
    # The float32 fits' weights evaluated in float64: the part of their distance to the truth
    # that the fit made, without the rounding of evaluating T in float32.
    with torch.no_grad():
        new_t_eval64 = new_cal.double().temperature(*_sample(data64))
        ref_t_eval64 = ref_cal.double().temperature(*_sample(data64))
    del data64
    # Both float64 fits on a smaller problem: what is left between the float32 fits is rounding.
    small = _as_float64(make_cached_logits(10_000, c, seed=seed))
    small_steps = min(steps, 200)
    ref64 = _ca_fit(small, small_steps, batch_size, precompute=False)[2]
    new64 = _ca_fit(small, small_steps, batch_size, precompute=True)[2]
    per_step_ms = 1e3 * (new_s - one_step_s) / max(steps - 1, 1)
    rows = [
        [
            "old benchmark loop (inputs and views' softmax every step, autograd loss)",
            f"{old_s:.1f}",
            f"{1e3 * old_s / steps:.2f}",
            f"{old_s / new_s:.1f}x",
            f"{old_cpu:.1f}",
            f"{old_cpu / new_cpu:.1f}x",
            "- (its own batch order)",
            "-",
        ],
        [
            "`fit_calibrator(precompute=False)`: the same, in `fit_calibrator`'s batch order",
            f"{ref_s:.1f}",
            f"{1e3 * ref_s / steps:.2f}",
            f"{ref_s / new_s:.1f}x",
            f"{ref_cpu:.1f}",
            f"{ref_cpu / new_cpu:.1f}x",
            "reference",
            _difference(ref_t, truth_t),
        ],
        [
            "`fit_calibrator(precompute=True)`: features once, closed-form step without "
            f"autograd (mean of 2 runs: {new_a:.2f}, {new_b:.2f} s)",
            f"{new_s:.2f}",
            f"{1e3 * new_s / steps:.2f}",
            "1.0x",
            f"{new_cpu:.2f}",
            "1.0x",
            _difference(new_t, ref_t),
            _difference(new_t, truth_t),
        ],
    ]
    body = (
        f"N = {n:,}, C = {c:,}, V = {NUM_VIEWS} views, k = 4, {steps} Adam steps (lr 1e-3) on "
        f"shuffled mini-batches of {batch_size}, float32; synthetic cached logits as in the "
        f"grid above (seed {seed}). A fit's time includes its one-off work (checks, features, "
        "shifted logits). One process, one run each (the fast one twice, before and after the "
        "slow ones), on a machine shared with other jobs: read the ratios. CPU time "
        "(`time.process_time`, one torch thread) leaves out the time the process waited for "
        "a core, not the slow-down of sharing caches and memory.\n\n"
        + markdown_table(
            [
                "CA fit",
                "s / fit",
                "ms / step",
                "time / precomputed",
                "CPU s / fit",
                "CPU time / precomputed",
                "max difference of T from the reference on 10,000 rows",
                "max difference of T from the float64 fit",
            ],
            rows,
        )
        + f"\nThe precomputed fit's time splits into {one_step_s:.2f} s of one-off work (a "
        f"1-step fit: input checks, one top-k of the logits for the top classes, row maxima "
        f"and predictions, the views' features, the (N, C) shifted logits) and "
        f"{per_step_ms:.2f} ms per step (the rest, over {steps - 1} steps). Per step: the "
        "batch's B x C shifted logits gathered from the (N, C) cache (rows in random order) and "
        "scaled by log2(e) / T in one pass (`embedding_bag`), four element-wise passes over "
        "them (exp2, sum, multiply, sum: the confidence and the moment of its closed-form "
        "gradient), then O(B) work: the MLP on (B, 12) inputs (run as W x^T), the CA "
        "objective's and every other gradient in closed form (no autograd graph) and Adam's "
        "update on the four parameters as one flat vector (`_FlatAdam`: torch.optim.Adam's "
        "single-tensor arithmetic; the reference fit uses torch's fused Adam).\n\n"
        f"The float64 truth is the same precomputed fit in float64 on the same data "
        f"({truth_s:.1f} s; last epoch's loss {truth_hist.train_loss[-1]:.7f}, float32 "
        f"reference {ref_hist.train_loss[-1]:.7f}, float32 precomputed "
        f"{new_hist.train_loss[-1]:.7f}). With the float32 fits' weights evaluated in float64 "
        "(no float32 rounding in computing T itself): reference "
        f"{_difference(ref_t_eval64, truth_t)}, precomputed "
        f"{_difference(new_t_eval64, truth_t)}. On N = 10,000, C = {c:,}, {small_steps} "
        "steps, the "
        f"float64 precomputed and per-step fits differ by {_difference(new64, ref64)}: the "
        "differences between the float32 fits are float32 rounding (the closed form and exp2 "
        "against autograd's softmax and its backward), carried through the Adam steps.\n"
    )
    return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10k only, 200 Adam steps")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="CA mini-batch (1000)")
    parser.add_argument("--repeats", type=int, default=None, help="TS fits timed (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine two threads that wait for "
        "each other made a small NLL evaluation ten times slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ca-speedup",
        action="store_true",
        help="only the CA fit with inputs computed once vs every step (N = 50k, C = 1000), "
        "published to docs/RESULTS.md",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    sizes = [10_000] if args.quick else [10_000, 50_000]
    classes = [10, 1000]
    steps = args.steps if args.steps is not None else (200 if args.quick else 1000)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if steps < 1 or repeats < 1 or args.batch_size < 1:
        raise SystemExit("--steps, --repeats and --batch-size must be >= 1")
    if args.ca_speedup:
        body = ca_speedup(50_000, 1000, steps, args.batch_size, args.seed)
        publish(
            "## CA calibrator fit: inputs computed once (issue 12.3)",
            body,
            command=["python", *sys.argv],
        )
        return

    # A first fit on a small problem: one-off costs (allocator, kernels) stay out of the table.
    warm = make_cached_logits(1000, 10, seed=args.seed)
    fit_temperature(warm.logits, warm.labels)
    fit_temperature_authors(warm.logits, warm.labels)

    rows = []
    started = time.perf_counter()
    for n in sizes:
        for c in classes:
            data = make_cached_logits(n, c, seed=args.seed)
            row = {"n": n, "c": c, "accuracy": data.accuracy}
            row["ts"] = bench_temperature_scaling(data, repeats)
            row["authors"] = bench_authors(data)
            row["ca"] = bench_ca_calibrator(data, steps, args.batch_size)
            rows.append(row)
            print(
                f"[N={n:,} C={c:,}] TS {row['ts']['fit_s']:.2f} s (T={row['ts']['t']:.3f}), "
                f"authors {row['authors']['fit_s']:.2f} s (T={row['authors']['t']:.3f}), "
                f"CA {row['ca']['fit_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            del data

    command = "python " + shlex.join(sys.argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Command: `{command}`  ")
    print(f"Date: {date}  ")
    print(f"Machine: {machine()}  ")
    print(
        f"Data: synthetic cached logits, V = {NUM_VIEWS} views, planted T = {PLANTED_T} (see the "
        f"script's docstring); `fit_temperature` times are the median of {repeats} fits, the "
        f"authors' LBFGS is timed once; total "
        f"{time.perf_counter() - started:.0f} s.\n"
    )
    print(speed_table(rows, steps, args.batch_size))
    print()
    print(planted_table(rows))
    print(
        "\nTS: `fit_temperature` = LBFGS with strong-Wolfe on log T in float64 (the logits are "
        "copied to float64 inside the fit, which the time includes). CA calibrator: a plain "
        "loop that indexes the cached (N, C) and (V, N, C) tensors per step; the view softmax "
        "over all C classes is recomputed in every step. Authors' LBFGS: lr 0.01, max_iter 50, "
        "no line search, on T in float32, from T = 1.5."
    )


if __name__ == "__main__":
    main()
