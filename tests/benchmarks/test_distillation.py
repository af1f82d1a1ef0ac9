"""benchmarks/distillation.py: a tiny end-to-end run, the derived figures, the memory meter."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("distillation")
    sys.modules.pop("bench_distillation", None)


def test_tiny_run_writes_every_table(bench, tmp_path):
    out = tmp_path / "sub" / "distillation.md"
    argv = ["--quick", "--cycles", "1", "--trainer-cycles", "1", "--batch", "4"]
    argv += ["--loss-batches", "4", "--loss-dims", "3", "--no-memory", "--out", str(out)]
    threads = torch.get_num_threads()
    text = bench.main(argv)
    torch.set_num_threads(threads)
    assert out.read_text() == text
    assert text.startswith(bench.HEADING)
    for heading in ("### DMD training step", "### Cross-check through", "### mmd2 and EL"):
        assert heading in text
    # Every EL / no-EL ratio of the step tables is a positive finite number.
    ratios = [float(r) for r in re.findall(r"\*\*(\d+\.\d+)\*\*", text)]
    assert len(ratios) >= 8 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert "All logged losses finite: True" in text
    assert "All losses finite: True" in text
    # The timing row of part 4, with the requested form names.
    assert re.search(r"^\| 4 \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \|$", text, re.M)
    assert "| B per side | mmd2 d=3 | EL |" in text


def test_step_kinds_follow_the_schedule(bench):
    teacher = bench.build_teacher(None)
    module = bench.make_module(teacher, el=True, device=torch.device("cpu"))
    module.log_grad_norm_every = 2
    batch = bench.real_batches(module.image_shape, 4, 1, torch.device("cpu"))[0]
    kinds, logs = [], []
    for _ in range(15):
        kinds.append(bench.step_kind(module))
        logs.append(module.train_step(batch))  # no Trainer, no stubs
    # Generator steps are training steps 4, 9, 14; the grad norms are logged at generator steps
    # 0 and 2 (log_grad_norm_every=2), with their logs.
    assert kinds == (["fake"] * 4 + ["gen_norms"] + ["fake"] * 4 + ["gen"]) + (
        ["fake"] * 4 + ["gen_norms"]
    )
    assert "train/grad_norm_el" in logs[4] and "train/grad_norm_el" not in logs[9]
    assert set(logs[0]) == {"train/loss_fake"}
    assert int(module.generator_steps) == 3 and int(module.fake_steps) == 15


def test_derived_figures_and_bootstrap(bench):
    samples = {
        "fake": [1.0, 2.0, 3.0],
        "gen": [10.0, 12.0],
        "gen_norms": [20.0],
        "cycle_off": [4.0, 5.0, 6.0],
    }
    d = bench.derived(samples)
    f, g, n = 2.0, 11.0, 20.0
    assert d["gen_config"] == pytest.approx((9 * g + n) / 10)
    assert d["avg_off"] == pytest.approx((4 * f + g) / 5)
    assert d["avg_config"] == pytest.approx((4 * f + (9 * g + n) / 10) / 5)
    assert d["avg_off_direct"] == 5.0
    doubled = {k: [2 * v for v in values] for k, values in samples.items()}
    intervals = bench.bootstrap_ratios(samples, doubled, reps=50)
    # The arms are resampled independently; a kind with one sample resamples to itself, so its
    # ratio is exactly 2 in every draw.
    assert intervals["gen_norms"] == (pytest.approx(2.0), pytest.approx(2.0))
    lo, hi = intervals["avg_config"]
    assert 0 < lo <= hi


def test_peak_meter_sees_a_known_allocation(bench):
    meter = bench.PeakMeter(torch.device("cpu"))
    size = 64 * 2**20

    def allocate() -> None:
        buffer = torch.ones(size // 4)  # touched, so resident
        assert float(buffer[-1]) == 1.0

    growth = min(meter.measure(allocate) for _ in range(3))
    # Within the method's resolution (about 1 MiB: other small buffers come and go).
    assert size - 2**20 <= growth < size + 16 * 2**20
    assert meter.measure(lambda: None) < 4 * 2**20
