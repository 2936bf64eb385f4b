"""The ``her2lab`` command: dispatch, ``--help`` listings, one-line errors, ``doctor``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from her2lab import CONF_DIR
from her2lab.cli import COMMANDS, main
from her2lab.doctor import FAIL, OK, run_checks
from her2lab.errors import Her2labError
from her2lab.help import command_groups, groups_text, options
from tests.helpers import REPO, write_hand_slide


def test_usage_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command 'trian'")


def test_every_command_target_exists():
    import importlib

    for c in COMMANDS.values():
        module, _, name = c.target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), c.target
        if c.config is not None:
            assert (CONF_DIR / f"{c.config}.yaml").is_file()


def test_help_groups_are_each_commands_own_and_never_partial():
    train = command_groups("train")
    assert {"model", "backbone", "data", "cohort", "experiment"} <= set(train) and train["model"] == "abmil"
    assert train["experiment"] is None
    assert set(command_groups("eval")) == {"cohort"}
    assert "model" not in command_groups("prepare")
    assert "_base" not in options("backbone") and "hne" in options("backbone")
    text = groups_text("train")
    assert "abmil*" in text and "_pretrain" not in text and "_synthetic" not in text


def test_cv_on_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cv", str(tmp_path / "nope")])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: not a folder"


def test_help_of_a_hydra_command_imports_no_heavy_module():
    """``--help`` composes the config without importing Lightning or torch (it must answer fast)."""
    code = ("import atexit, sys; from her2lab.cli import main; "
            "atexit.register(lambda: print('HEAVY', [m for m in ('torch', 'pytorch_lightning', 'timm', 'openslide') "
            "if m in sys.modules])); main(['train', '--help'])")  # Hydra exits after --help
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== Config groups" in res.stdout and "HEAVY []" in res.stdout


def test_missing_tensorboard_is_one_line(monkeypatch):
    import importlib.util

    from her2lab.run.loggers import _require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.raises(Her2labError, match=r"her2lab\[tensorboard\]"):
        _require_extra("lightning.pytorch.loggers.TensorBoardLogger")
    _require_extra("lightning.pytorch.loggers.CSVLogger")  # others need nothing


def test_doctor_opens_a_hand_written_slide_and_names_a_bad_one(tmp_path):
    good = write_hand_slide(tmp_path / "good.tiff")
    checks = {c.name: c for c in run_checks(slide=good, data_dir=tmp_path / "d", log_dir=tmp_path / "l")}
    assert checks["slide"].status == OK and "0.500 µm/px" in checks["slide"].detail
    assert checks["torch"].status == OK and checks["openslide library"].status == OK
    assert checks["data folder"].status == OK and "will be created" in checks["data folder"].detail

    bad = tmp_path / "notes.tiff"
    bad.write_text("not a slide")
    checks = {c.name: c for c in run_checks(slide=bad)}
    assert checks["slide"].status == FAIL and "notes.tiff" in checks["slide"].detail


def test_doctor_command_exits_nonzero_on_a_failed_check(tmp_path):
    bad = tmp_path / "x.svs"
    bad.write_bytes(b"\0" * 64)
    res = subprocess.run([sys.executable, "-m", "her2lab", "doctor", "--slide", str(bad)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert any(line.startswith("FAIL  slide") for line in res.stdout.splitlines())
    assert "checks: 1 failed" in res.stdout


def test_fast_help_prints_what_hydras_own_help_prints():
    """``--help`` is answered without Hydra's listing of every group; the text is Hydra's own."""
    ours = subprocess.run([sys.executable, "-m", "her2lab", "train", "--help", "model=convnext", "data=thumbnail"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    code = ("import sys, hydra; from her2lab import CONF_DIR; from her2lab.cli import COMMANDS; "
            "from her2lab.help import register_resolvers; "
            "register_resolvers({c.name: c.summary for c in COMMANDS.values()}); "
            "sys.argv = ['x', '--help', 'model=convnext', 'data=thumbnail']; "
            "hydra.main(version_base='1.3', config_path=str(CONF_DIR), config_name='train')(lambda cfg: None)()")
    theirs = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr[-1000:] + theirs.stderr[-1000:]
    assert "ImageClassifierModule" in ours.stdout
    assert ours.stdout == theirs.stdout
