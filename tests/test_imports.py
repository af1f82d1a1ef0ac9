"""What importing each layer pulls in (DESIGN.md): the pure sub-packages never import Lightning.

Each case runs in a fresh interpreter (this one has imported everything already). Two rules:

* no module under ``losses/``, ``metrics/``, ``nets/``, ``diffusion/`` imports Lightning: the
  sub-package AND every module under it are imported (``pkgutil.walk_packages``), so a module
  that no ``__init__`` re-exports counts too;
* importing a sub-package (its ``__init__``), or ``lightning_losses`` itself, loads none of the
  heavy optional libraries: they are imported where used (``torchmetrics``, which loads
  matplotlib and torchvision's data sets on import, only by the modules of Metric classes;
  diffusers only by its wrappers in ``diffusion/pipelines.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PURE = ["lightning_losses.losses", "lightning_losses.metrics", "lightning_losses.nets",
        "lightning_losses.diffusion"]  # fmt: skip
LIGHTNING = ["lightning", "pytorch_lightning", "lightning_fabric"]
HEAVY = ["diffusers", "matplotlib", "torchvision.datasets", "torchmetrics"]
#: package -> what ``import package`` alone must not load, per DESIGN.md.
FORBIDDEN_ON_IMPORT = {
    "lightning_losses": [*LIGHTNING, *HEAVY, "torch"],  # the top level stays light
    "lightning_losses.losses": [*LIGHTNING, *HEAVY, "torchvision"],  # torch only
    "lightning_losses.metrics": [*LIGHTNING, *HEAVY],
    "lightning_losses.nets": [*LIGHTNING, *HEAVY, "torchvision"],  # torchvision where used
    "lightning_losses.diffusion": [*LIGHTNING, *HEAVY],
}
#: package -> code run after ``import package`` (as ``package``): calling its functions must not
#: load what :data:`FORBIDDEN_ON_IMPORT` names either.
USE = {
    "lightning_losses.metrics": (
        "import torch; p = torch.tensor([[0.7, 0.3], [0.2, 0.8]]); y = torch.tensor([0, 0]); "
        "package.calibration_error(p, y); package.correctness_auroc(p, y)"
    ),
}

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
exec(sys.argv[3])
on_import = sorted(sys.modules)
names = [sys.argv[1]]
if sys.argv[2] == "walk":
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps({"imported": names, "on_import": on_import, "loaded": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def probes() -> dict[str, subprocess.CompletedProcess[str]]:
    """For every package, a fresh interpreter: ``sys.modules`` after ``import package`` (and its
    :data:`USE`), then after the walk (pure packages). The interpreters run at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    running = {}
    for package in FORBIDDEN_ON_IMPORT:
        walk = "walk" if package in PURE else "top"
        argv = [sys.executable, "-c", _PROBE, package, walk, USE.get(package, "")]
        running[package] = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for package, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[package] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                       stderr)  # fmt: skip
    return results


def _present(names: list[str], loaded: list[str]) -> list[str]:
    return sorted(n for n in names if n in loaded or any(m.startswith(n + ".") for m in loaded))


@pytest.mark.parametrize("package", sorted(FORBIDDEN_ON_IMPORT))
def test_imports_follow_the_layering(package, probes):
    walk = package in PURE
    result = probes[package]
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    bad = _present(FORBIDDEN_ON_IMPORT[package], found["on_import"])
    assert not bad, f"import {package} loaded {bad}: import them where they are used"
    if walk:
        assert len(found["imported"]) > 2, found["imported"]  # the walk found the modules
        bad = _present(LIGHTNING, found["loaded"])
        assert not bad, f"importing {package} and its modules {found['imported']} loaded {bad}"
