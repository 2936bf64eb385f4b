"""The prepare task through Hydra: the demo cohort from the command line, and manifest ids that
would name files outside their folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.errors import ManifestError
from tests.helpers import compose_config, run_task


def _run(args, cwd):
    return run_task("her2lab.prepare", *args, cwd=cwd, data_dir=cwd / "data", log_dir=cwd / "logs", timeout=300)


@pytest.mark.slow
def test_hydra_entry_builds_demo_cohort(tmp_path):
    args = ["cohort=demo", "cohort.synthetic.n_slides=4", "cohort.synthetic.n_pairs=1", "num_workers=2"]
    res = _run(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cache = tmp_path / "data" / "demo"
    report = pd.read_csv(cache / "prepare_report.csv")
    assert len(report) == 4 and (report.status == "done").all()
    assert len(list((cache / "qc" / "0.5mpp_224px_0px_overlap").glob("*.png"))) == 4
    assert len(list((cache / "thumbs" / "8mpp").glob("*.png"))) == 4
    res = _run([*args, "tiling=paper_a"], tmp_path)  # another tiling lands beside the first
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((cache / "tiles" / "0.5mpp_96px_0px_overlap").glob("*.h5"))) == 4


@pytest.mark.slow
def test_hydra_entry_bad_manifest_is_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,path\na,a.svs\n")
    res = _run(["cohort=custom", f"cohort.manifest={tmp_path / 'm.csv'}"], tmp_path)
    assert res.returncode == 1
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "missing column(s) patient_id, her2_score" in lines[-1]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "logs").exists()  # a call that failed before writing leaves no run folder


BARE_HEADER = "slide_id,patient_id,path,her2_score\n"
TINY = {"width_px": 1024, "height_px": 768, "mpp": 1.0}  # 1 × 0.77 mm: the smallest the generator makes


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _tiny_cohort(root: Path, n: int = 2, **kw) -> tuple[Path, SyntheticConfig]:
    cfg = SyntheticConfig(n_slides=n, n_pairs=0, seed=5, **TINY, **kw)
    return generate_cohort(root, cfg, num_workers=1), cfg


def _prepare_cfg(manifest: Path, data: Path):
    return compose_config("prepare", [
        "cohort=custom", f"cohort.manifest={manifest}", f"paths.data_dir={data}", f"paths.output_dir={data}/run",
        "num_workers=1", "tiling.target_mpp=1.0", "tiling.patch_px=64",
    ])


def test_prepare_on_unsafe_ids_writes_nothing_anywhere(tmp_path):
    from her2lab.run.prepare import run_prepare as run

    _tiny_cohort(tmp_path / "demo")
    slide = next((tmp_path / "demo" / "slides").glob("*.tiff"))
    # data_dir sits deep enough that every escape lands inside tmp_path, where it can be seen.
    data = tmp_path / "a" / "b" / "c" / "d" / "data"
    manifest = _write_text(tmp_path / "cohort" / "manifest.csv",
                      BARE_HEADER + f"../../../../x,P1,{slide},1+\n{tmp_path}/abs,P2,{slide},0\n")
    before = _files(tmp_path)
    with pytest.raises(ManifestError, match="on line 2 cannot name files"):
        run(_prepare_cfg(manifest, data))
    assert _files(tmp_path) == before

    # The same slide under a safe id is prepared, inside data_dir only.
    _write_text(manifest, BARE_HEADER + f"x,P1,{slide},1+\n")
    report = run(_prepare_cfg(manifest, data))
    assert list(report.status) == ["done"] and report.n_tiles[0] > 10
    assert all(data in p.parents for p in _files(tmp_path) - before)
