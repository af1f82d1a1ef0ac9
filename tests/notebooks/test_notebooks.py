"""Execute every notebook in notebooks/ in its fast mode, on this interpreter's kernel.

Convention for notebooks (see notebooks/README.md): read ``LIGHTNING_LOSSES_FAST`` in the first
code cell, and end with a code cell that prints one JSON object holding at least
``"fast": <bool>``; per-notebook checks on that object live in ``SUMMARY_CHECKS`` below.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"


def _kernel_manager(spec_root: Path) -> AsyncKernelManager:
    """A manager whose "python3" kernel is ``sys.executable`` with its ipykernel.

    A spec found by jupyter's usual search (a user's ``~/.local/share/jupyter``, another
    environment's) may start a different interpreter; this one is written for the test alone.
    """
    spec_dir = spec_root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major} (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")])
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LIGHTNING_LOSSES_FAST="1",
        HF_HUB_OFFLINE="1",
        # The models are tiny and the CI machine small: one thread is the fastest.
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    return env


def _summary(notebook: Any) -> dict[str, Any]:
    """The JSON object printed by the last code cell."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, "the notebook has no code cell"
    text = "".join(
        output.get("text", "")
        for output in code_cells[-1].outputs
        if output.output_type == "stream" and output.get("name") == "stdout"
    )
    start = text.find("{")
    assert start >= 0, f"the last code cell must print a JSON object, it printed {text!r}"
    summary = json.loads(text[start:])
    assert isinstance(summary, dict), f"the summary must be a JSON object, got {summary!r}"
    return summary


def _check_opl(summary: dict[str, Any]) -> None:
    for model in ("opl", "ce"):
        acc = summary[f"{model}_test_acc"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (model, acc)
        gap = summary[f"{model}_cos_gap"]
        # intra - inter of cosines, each in [-1, 1]
        assert isinstance(gap, float) and math.isfinite(gap) and -2.0 <= gap <= 2.0, (model, gap)
    # Toy gradient descent: OPL makes the class centroids orthogonal (ReLU features, or "pair").
    for setting in ("ReLU, none", "signed, pair"):
        assert summary["toy"][setting]["max_abs_centroid_cos"] < 0.1, summary["toy"][setting]
    assert summary["toy"]["signed, none"]["inter_cos"] < -0.4, summary["toy"]["signed, none"]
    for rate in ("noise=0.0", "noise=0.4"):
        assert set(summary["digits"][rate]) == {"ce", "opl"}


def _check_distillation(summary: dict[str, Any]) -> None:
    arms = {f"{framework}{el}" for framework in ("DMD", "DI", "CM") for el in ("", "+EL")}
    assert arms <= set(summary["fid"]), sorted(summary["fid"])
    fids = {**summary["fid"], "teacher": summary["teacher_fid"]}
    for name, fid in fids.items():
        assert isinstance(fid, float) and math.isfinite(fid) and fid > 0.0, (name, fid)
    # Saving the teacher and a generator, then reloading them, gives the same samples.
    assert summary["teacher_roundtrip_identical"] is True
    assert summary["export_identical"] is True, summary["export_max_abs_diff"]
    ratio = summary["grad_norm_ratio"]["median"]
    assert math.isfinite(ratio) and ratio > 0.0, ratio


SUMMARY_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "01_orthogonal_projection_loss": _check_opl,
    "03_diffusion_distillation": _check_distillation,
}


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebook in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {index} of {path.name} holds outputs: clear them"
            assert cell.execution_count is None, f"cell {index} of {path.name} has a count"


async def _execute(path: Path, spec_root: Path) -> Any:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=_kernel_manager(spec_root),
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    await client.async_execute(env=_kernel_env())  # raises CellExecutionError at a failing cell
    return notebook


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, Any]:
    """Every notebook run at once, each in its own kernel (a process: the cores share the work).

    Returns ``{stem: the executed notebook, or the exception it raised}`` and, under
    ``"written"``, what appeared in (or went from) notebooks/ meanwhile.
    """
    before = set(NOTEBOOK_DIR.rglob("*"))

    async def run_all() -> list[Any]:
        roots = [tmp_path_factory.mktemp(f"jupyter_{path.stem}") for path in NOTEBOOKS]
        runs = [_execute(path, root) for path, root in zip(NOTEBOOKS, roots)]
        return await asyncio.gather(*runs, return_exceptions=True)

    outcomes = asyncio.run(run_all())
    changed = set(NOTEBOOK_DIR.rglob("*")) ^ before  # written or removed
    written = sorted(p.relative_to(NOTEBOOK_DIR) for p in changed)
    return {"written": written, **{p.stem: o for p, o in zip(NOTEBOOKS, outcomes)}}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_fast_mode(path, executed):
    notebook = executed[path.stem]
    if isinstance(notebook, BaseException):
        raise notebook  # CellExecutionError names the failing cell
    summary = _summary(notebook)
    assert summary.get("fast") is True, "the notebook must read LIGHTNING_LOSSES_FAST=1"
    check = SUMMARY_CHECKS.get(path.stem)
    if check is not None:
        check(summary)
    assert not executed["written"], f"the notebooks wrote into notebooks/: {executed['written']}"
