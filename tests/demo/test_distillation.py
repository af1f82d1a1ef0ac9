"""The distillation part of ``make demo`` in its quick mode: every arm runs, the report is true."""

from __future__ import annotations

import json

import yaml

from lightning_losses.demo import distillation, part_results, run_tasks


def test_quick_distillation_demo_writes_report_and_figures(tmp_path):
    # In two worker processes, as `python -m lightning_losses.demo` runs it (distillation.run
    # is the same tasks in this process).
    tasks = distillation.tasks(tmp_path, quick=True)
    assert [t.key for t in tasks] == ["teacher", "DMD", "DMD+EL", "DI", "DI+EL", "CM", "CM+EL"]
    results = part_results(run_tasks(tasks, jobs=2), "distillation")
    report = distillation.report(results, tmp_path, quick=True)
    results = json.loads((tmp_path / "distillation_results.json").read_text())
    names = ["DMD", "DMD+EL", "DI", "DI+EL", "CM", "CM+EL"]
    assert list(results["runs"]) == names
    for name, run in results["runs"].items():
        framework, el = name.split("+")[0], name.endswith("+EL")
        config = yaml.safe_load(distillation.config_path(framework, el).read_text())
        # the EL weight is the config's own; the arms without EL have none
        assert run["el_weight"] == config["model"]["init_args"]["el_weight"]
        assert (run["el_weight"] > 0) == el
        steps = [step for step, _ in run["history"]]
        assert steps[-1] == 4 and steps == sorted(set(steps))
        assert run["fid"] == run["history"][-1][1] > 0
        assert f"| {name} | {run['el_weight']:g} | 4 | {run['fid']:.3f} |" in report
    assert 0 < results["teacher_fid"] < min(r["fid"] for r in results["runs"].values())
    for figure in ("distillation_fid.png", "distillation_samples.png"):
        assert (tmp_path / figure).stat().st_size > 1000


def test_global_steps_count_every_optimizer():
    dmd = {"fake_updates_per_generator": 5}
    assert distillation.global_steps(dmd, "lightning_losses.modules.DMDDistillation", 10) == 60
    di = {"fake_updates_per_generator": 1}
    assert (
        distillation.global_steps(di, "lightning_losses.modules.DiffInstructDistillation", 10) == 20
    )
    cm_path = "lightning_losses.modules.ConsistencyDistillation"
    assert distillation.global_steps({}, cm_path, 10) == 10
