"""The ``lightning-losses`` command as a user runs it, and :func:`run_config` from Python."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_losses.cli import LossesCLI, main, packaged_config, run_config
from tests.fakes import QUIET_ARGS

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "opl" / "digits.yaml"
#: The console script that ``pip install`` put beside this interpreter.
SCRIPT = Path(sys.executable).parent / "lightning-losses"
TINY = [  # a run of a few batches that writes nothing
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.callbacks=[]",
    *QUIET_ARGS,
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """The console script run twice, at once (each start imports Lightning: a core each).

    ``"ok"``: the digits config with ``fast_dev_run``; ``"typo"``: the same with ``max_epoch``.
    Returns ``{name: (result, working directory)}``.
    """
    assert SCRIPT.is_file(), f"{SCRIPT} missing: install the package (make test does)"
    typo = yaml.safe_load(DIGITS.read_text())
    typo["trainer"]["max_epoch"] = typo["trainer"].pop("max_epochs")
    runs = {}
    for name in ("ok", "typo"):
        cwd = tmp_path_factory.mktemp(f"console_{name}")
        config = DIGITS
        if name == "typo":
            config = cwd / "typo.yaml"
            config.write_text(yaml.safe_dump(typo))
        argv = [str(SCRIPT), "fit", "--config", str(config), "--trainer.fast_dev_run=true"]
        process = subprocess.Popen(
            argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs[name] = (argv, process, cwd)
    results = {}
    for name, (argv, process, cwd) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), cwd)
    return results


def test_console_script_exits_0_after_a_successful_fit(console):
    result, _ = console["ok"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "LossesCLI object" not in result.stdout + result.stderr
    assert "fast_dev_run" in result.stdout + result.stderr  # it did run the Trainer


def test_console_script_exits_non_zero_with_jsonargparse_message_on_a_typo(console):
    result, cwd = console["typo"]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "does not accept option 'trainer.max_epoch'" in result.stderr
    assert not (cwd / "runs").exists()  # nothing ran


def test_main_returns_none_for_the_command_line(monkeypatch, tmp_path):
    argv = ["lightning-losses", "fit", "--config", str(DIGITS), *TINY]
    monkeypatch.setattr(sys, "argv", [*argv, f"--trainer.default_root_dir={tmp_path}"])
    assert main() is None  # so that the console script's sys.exit(main()) exits 0
    monkeypatch.setattr(sys, "argv", ["lightning-losses", "fit", "--config", str(DIGITS), "--no"])
    with pytest.raises(SystemExit) as error:
        main()
    assert error.value.code == 2


def test_main_with_args_returns_the_cli(tmp_path):
    cli = main(args=["--config", str(DIGITS), *TINY], run=False)
    assert isinstance(cli, LossesCLI) and cli.model.num_classes == 10


def test_run_config_fits_a_file_with_overrides(tmp_path):
    cli = run_config(DIGITS, [*TINY, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/opl"])
    assert cli.model.opl_weight == 1.0 and cli.model.num_classes == 10


def test_run_config_dict_file_and_overrides_build_the_same_model():
    config = yaml.safe_load(DIGITS.read_text())
    from_file = run_config(DIGITS, ["--model.init_args.gamma=0.25"], subcommand=None)
    config["model"]["init_args"]["gamma"] = 0.25
    from_dict = run_config(config, subcommand=None)
    del config["model"]["init_args"]["gamma"]
    from_dict_overrides = run_config(config, ["--model.init_args.gamma=0.25"], subcommand=None)
    reference = from_file.model.state_dict()
    for cli in (from_dict, from_dict_overrides):
        assert cli.model.hparams.gamma == 0.25 and cli.trainer.max_epochs == 30
        state = cli.model.state_dict()  # seed_everything: 0 before each build
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert from_file.trainer.fit_loop.epoch_progress.current.completed == 0  # built, not run


def test_run_config_ignores_the_callers_sys_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["my_script.py", "--quick", "--out", "x"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_config(DIGITS, TINY, subcommand=None)
    assert cli.trainer.max_epochs == 1
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_run_config_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="subcommand must be one of"):
        run_config(DIGITS, subcommand="train")
    with pytest.raises(ValueError, match="overrides must be a list"):
        run_config(DIGITS, "--trainer.max_epochs=1")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        run_config(tmp_path / "missing.yaml")
    config = yaml.safe_load(DIGITS.read_text())
    config["trainer"]["max_epoch"] = 1
    with pytest.raises(SystemExit):
        run_config(config, subcommand=None)


def test_packaged_configs_are_the_repository_configs():
    """One copy: the package's configs/ is the repository's (a link), so the two cannot drift."""
    repo_files = sorted(p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml"))
    assert repo_files, "no configs found"
    for relative in repo_files:
        packaged = packaged_config(str(relative))
        assert packaged.read_bytes() == (REPO / "configs" / relative).read_bytes(), relative
    link = REPO / "lightning_losses" / "configs"
    assert link.is_symlink() and link.resolve() == (REPO / "configs").resolve()
    with pytest.raises(FileNotFoundError, match="opl/nope.yaml"):
        packaged_config("opl/nope.yaml")
