"""The wheel as a user installs it: built from the sources, installed into a fresh virtualenv
outside the clone, and run from another folder through the ``her2lab`` console command.

The fresh environment gets the wheel only (``--no-deps``); the dependencies it needs come from
this environment's site-packages through a ``.pth`` line, which adds them to ``sys.path`` after
the fresh environment's own packages (so ``her2lab`` is the wheel's, never this clone's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, write_hand_slide

pytestmark = pytest.mark.slow


def _copy_sources(dst: Path) -> Path:
    """The tracked sources (what a clone holds), without build leftovers or local caches."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src, out = REPO / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, out)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the her2lab wheel installed; returns its ``bin`` folder."""
    root = tmp_path_factory.mktemp("package")
    src = _copy_sources(root / "src")
    dist = root / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src]
    if subprocess.run([*build, "--no-build-isolation"], capture_output=True).returncode != 0:
        subprocess.run(build, check=True, capture_output=True, text=True)  # setuptools from the index
    wheel = next(dist.glob("her2lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "her2lab/conf/train.yaml" in names and "her2lab/conf/hydra/help/her2lab.yaml" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    py = bin_dir / "python"
    fresh_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(fresh_site, "her2lab_test_deps.pth").write_text("\n".join(sorted(here)) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True,
                   capture_output=True, text=True)
    return bin_dir


def _her2lab(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HER2LAB_DATA_DIR", "HER2LAB_LOG_DIR")}
    env["WANDB_MODE"] = "offline"
    return subprocess.run([bin_dir / "her2lab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_installs_configs_and_console_command(installed, tmp_path):
    out = subprocess.run([installed / "python", "-c", "import her2lab; print(her2lab.__file__, her2lab.CONF_DIR)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]).is_relative_to(installed.parent), out  # the wheel's copy, not the clone's
    assert (Path(out[1]) / "train.yaml").is_file()

    t0 = time.perf_counter()
    res = _her2lab(installed, "train", "--help", cwd=tmp_path)
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    assert "her2lab train:" in res.stdout and "model:" in res.stdout and "abmil*" in res.stdout
    groups = res.stdout.split("== Config groups")[1].split("== Config (")[0]
    assert "backbone:" in groups and "_base" not in groups and "_pretrain" not in groups  # partial configs
    print(f"her2lab train --help: {took:.2f} s")
    assert not (tmp_path / "logs").exists()  # --help makes no run folder


def test_wheel_prepares_a_hand_written_slide_from_another_folder(installed, tmp_path):
    (tmp_path / "slides").mkdir()
    write_hand_slide(tmp_path / "slides" / "a.tiff")
    (tmp_path / "slides" / "m.csv").write_text("slide_id,patient_id,path,her2_score\na,P1,a.tiff,2+\n")
    work = tmp_path / "work"
    work.mkdir()
    res = _her2lab(installed, "prepare", "cohort=custom", f"cohort.manifest={tmp_path / 'slides' / 'm.csv'}",
                   "num_workers=1", cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((work / "data" / "custom" / "tiles").rglob("a.h5"))  # relative paths: the launch folder
    assert list((work / "logs" / "prepare" / "runs").glob("*/prepare.log"))

    bad = tmp_path / "bad"
    bad.mkdir()
    res = _her2lab(installed, "prepare", "cohort=custom", cwd=bad)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["error: cohort.manifest is required: add cohort.manifest=<value> "
                                               "to the command"]
    assert not any(bad.iterdir())  # no empty run folder left behind
