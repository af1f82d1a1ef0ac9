"""The demo from an installed wheel, run from an empty folder (no repository beside it).

``pip wheel . --no-deps`` builds the wheel from a copy of the source tree (so no ``build/``
folder lands in the checkout); it is installed into a fresh venv that reuses this environment's
packages (a ``.pth`` line naming its site-packages: ``--system-site-packages`` of a venv made
from a venv reaches the base interpreter's, not the venv's) and runs the quick OPL part.
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


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


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


def test_the_wheel_ships_the_configs_and_the_package_resolves_them(installed, tmp_path):
    code = (
        "import json, lightning_losses, lightning_losses.cli as cli; "
        "config = cli.packaged_config('opl/digits.yaml'); "
        "print(json.dumps([lightning_losses.__file__, str(config)]))"
    )
    package, config = json.loads(_run([str(installed), "-c", code], tmp_path).stdout)
    venv_dir = installed.parents[1]
    assert Path(package).is_relative_to(venv_dir), package  # not the checkout's copy
    assert Path(config).is_relative_to(venv_dir) and not Path(config).is_symlink()
    assert Path(config).read_bytes() == (REPO / "configs/opl/digits.yaml").read_bytes()


def test_the_installed_demo_runs_from_an_empty_folder(installed, tmp_path):
    result = _run(
        [str(installed), "-m", "lightning_losses.demo", "--quick", "--parts", "opl",
         "--out", "out", "--jobs", "2"], tmp_path)  # fmt: skip
    assert "1 torch thread each" in result.stdout
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## OPL: CE vs CE + OPL on digits" in report
    assert "| 40% | CE+OPL |" in report
    results = json.loads((tmp_path / "out" / "opl_results.json").read_text())
    assert sorted(results) == ["0.0/CE", "0.0/CE+OPL", "0.4/CE", "0.4/CE+OPL"]
    accuracy = {key: runs[0]["acc"] for key, runs in results.items()}
    assert all(0.2 < acc <= 1.0 for acc in accuracy.values()), accuracy  # 2 epochs: above chance
    assert accuracy["0.0/CE"] > 0.6, accuracy

    # Two worker processes give what one process running the runs in order gives (the same
    # installed code: the checkout may change while the tests run).
    _run([str(installed), "-m", "lightning_losses.demo", "--quick", "--parts", "opl",
          "--out", "serial", "--jobs", "1"], tmp_path)  # fmt: skip
    serial = json.loads((tmp_path / "serial" / "opl_results.json").read_text())
    assert serial == results
