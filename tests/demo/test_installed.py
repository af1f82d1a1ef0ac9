"""The demo from an installed wheel, run from an empty folder (no repository beside it).

``pip wheel . --no-deps`` builds the wheel from a copy of the source tree (so no ``build/``
folder lands in the checkout); it is installed into a fresh venv that reuses this environment's
packages (a ``.pth`` line naming its site-packages: ``--system-site-packages`` of a venv made
from a venv reaches the base interpreter's, not the venv's) and runs the quick OPL part in two
worker processes; one more installed process checks two of its runs against ``--jobs 1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True)


def _finish(process: subprocess.Popen[str], timeout: int = 600) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    argv = process.args
    assert process.returncode == 0, f"{argv}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return _finish(_start(argv, cwd))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a venv with the package installed from its wheel."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "lightning_losses", source / "lightning_losses", symlinks=True,
                    ignore=ignore)  # fmt: skip
    shutil.copytree(REPO / "configs", source / "configs", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)], source)
    (wheel,) = wheels.glob("lightning_losses-*.whl")

    env_dir = root / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    new_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    root).stdout.strip()  # fmt: skip
    (Path(new_site) / "project_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(wheel)], root)  # fmt: skip
    return python


# In the installed interpreter, in one process: where the package and its config resolve, and
# two of the demo's OPL tasks (one per arm and noise rate) run in order, as ``--jobs 1`` runs them.
_IN_PROCESS = """
import json, sys
from pathlib import Path
import lightning_losses
from lightning_losses.cli import packaged_config
from lightning_losses.demo import opl, part_results, run_tasks
tasks = [t for t in opl.tasks(Path("serial"), quick=True) if t.key in sys.argv[1:]]
outcomes = part_results(run_tasks(tasks, jobs=1), "opl")
drop = ("pca", "labels")
kept = {key: {k: v for k, v in o.items() if k not in drop} for key, o in outcomes.items()}
print(json.dumps([lightning_losses.__file__, str(packaged_config("opl/digits.yaml")), kept]))
"""
SERIAL_TASKS = ("0.0/CE/0", "0.4/CE+OPL/0")


@pytest.fixture(scope="module")
def runs(installed, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The installed demo (two workers) and the one-process check, started at once (three
    processes, two of them the demo's: the cores stay busy). ``{name: (result, cwd)}``."""
    started = {}
    for name, argv in [
        ("demo", ["-m", "lightning_losses.demo", "--quick", "--parts", "opl", "--out", "out",
                  "--jobs", "2"]),
        ("in_process", ["-c", _IN_PROCESS, *SERIAL_TASKS]),
    ]:  # fmt: skip
        cwd = tmp_path_factory.mktemp(name)  # an empty folder
        started[name] = (_start([str(installed), *argv], cwd), cwd)
    try:
        return {name: (_finish(process), cwd) for name, (process, cwd) in started.items()}
    finally:
        for process, _ in started.values():
            if process.poll() is None:  # the other one failed first: leave nothing running
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def in_process(runs) -> tuple[str, str, dict]:
    """(package file, packaged config, {task key: outcome}) from one installed process."""
    result, _ = runs["in_process"]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo(runs) -> tuple[Path, str]:
    """(output folder, stdout) of the installed demo's quick OPL part in two worker processes."""
    result, cwd = runs["demo"]
    return cwd / "out", result.stdout


def test_the_wheel_ships_the_configs_and_the_package_resolves_them(installed, in_process):
    package, config, _ = in_process
    venv_dir = installed.parents[1]
    assert Path(package).is_relative_to(venv_dir), package  # not the checkout's copy
    assert Path(config).is_relative_to(venv_dir) and not Path(config).is_symlink()
    assert Path(config).read_bytes() == (REPO / "configs/opl/digits.yaml").read_bytes()


def test_the_installed_demo_runs_from_an_empty_folder(demo):
    out, stdout = demo
    assert "1 torch thread each" in stdout
    report = (out / "report.md").read_text()
    assert "## OPL: CE vs CE + OPL on digits" in report
    assert "| 40% | CE+OPL |" in report
    results = json.loads((out / "opl_results.json").read_text())
    assert sorted(results) == ["0.0/CE", "0.0/CE+OPL", "0.4/CE", "0.4/CE+OPL"]
    accuracy = {key: runs[0]["acc"] for key, runs in results.items()}
    assert all(0.2 < acc <= 1.0 for acc in accuracy.values()), accuracy  # 2 epochs: above chance
    assert accuracy["0.0/CE"] > 0.6, accuracy


def test_worker_processes_give_what_one_process_gives(demo, in_process):
    # The same installed code (the checkout may change while the tests run); one task of each
    # arm and each noise rate, every field of its outcome.
    out, _ = demo
    results = json.loads((out / "opl_results.json").read_text())
    _, _, serial = in_process
    assert sorted(serial) == sorted(SERIAL_TASKS)
    for key, outcome in serial.items():
        noise, arm, seed = key.split("/")
        (pooled,) = [run for run in results[f"{noise}/{arm}"] if run["seed"] == int(seed)]
        assert pooled == {"seed": int(seed), **outcome}, key
