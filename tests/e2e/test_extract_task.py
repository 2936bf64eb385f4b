"""The extract task as users run it: the command line, killed and resumed, sharded across
processes and submitit jobs, and its failures report."""

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compose_config, hand_manifest, run_task, task_command, task_env
from tests.helpers import read_features_file as _read


@pytest.mark.slow
def test_offline_hub_error_says_how_to_use_a_file(tmp_path):
    # The user-facing path, offline: a one-line error before any slide work, naming the fix.
    res = run_task("her2lab.extract", "backbone=imagenet", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                   data_dir=tmp_path / "data", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: backbone imagenet: could not fetch pretrained resnet18")
    assert "backbone.weights=/path/to/weights" in last and "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()  # failed before generating or reading anything


@pytest.fixture
def weights(r18_weights):
    return r18_weights


# --- the command line: kill + resume, and sharding across processes ----------------------------

def _cli(tmp_path: Path, weights: Path, *args: str) -> list[str]:
    return [
        "cohort=demo", "cohort.synthetic.n_slides=4",
        "cohort.synthetic.n_pairs=1", "backbone=timm", "backbone.name=resnet18", f"backbone.weights={weights}",
        "backbone.preset=resnet18", "backbone.input_px=64", "backbone.target_mpp=2.0", "extract.batch_size=8",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", "prepare.qc=false", *args,
    ]


def _features(tmp_path: Path) -> dict[str, tuple]:
    folder = tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    return {p.stem: _read(p)[:2] for p in sorted(folder.glob("*.h5"))}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_files(tmp_path, weights):
    # Uninterrupted reference.
    ref = tmp_path / "ref"
    res = run_task("her2lab.extract", *_cli(ref, weights), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = _features(ref)
    assert len(want) == 4
    # Same cohort, killed once the first slide is written, then run again.
    run = tmp_path / "run"
    shutil.copytree(ref / "data" / "demo", run / "data" / "demo", ignore=shutil.ignore_patterns("features"))
    proc = subprocess.Popen(task_command("her2lab.extract", *_cli(run, weights)), cwd=tmp_path, env=task_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = run / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("*.h5")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert 1 <= len(list(folder.glob("*.h5"))) < 4  # killed mid-cohort
    res = run_task("her2lab.extract", *_cli(run, weights), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _features(run)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k][0], want[k][0]) and np.array_equal(got[k][1], want[k][1])


@pytest.mark.slow
def test_two_processes_shard_the_cohort_exactly_once(tmp_path, weights):
    single = tmp_path / "single"
    res = run_task("her2lab.extract", *_cli(single, weights), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = _features(single)
    multi = tmp_path / "multi"
    shutil.copytree(single / "data" / "demo", multi / "data" / "demo", ignore=shutil.ignore_patterns("features"))
    procs = [
        subprocess.Popen(task_command("her2lab.extract", *_cli(multi, weights, f"extract.shard={i}", "extract.num_shards=2")),
                         cwd=tmp_path, env=task_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    folder = multi / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    reports = [pd.read_csv(folder / f"extract_report_shard{i}of2.csv") for i in range(2)]
    done = [sid for r in reports for sid in r.slide_id[r.status == "done"]]
    assert sorted(done) == sorted(want)  # every slide exactly once
    got = _features(multi)
    for k in want:
        assert np.array_equal(got[k][0], want[k][0])


@pytest.mark.slow
def test_submitit_local_launcher_shards_like_slurm(tmp_path, weights):
    # The SLURM recipe (docs/encoders.md) with the local submitit executor: two jobs, one per shard.
    args = _cli(tmp_path, weights, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                "extract.num_shards=2", "extract.shard=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    res = run_task("her2lab.extract", "--multirun", *args, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    reports = [pd.read_csv(folder / f"extract_report_shard{i}of2.csv") for i in range(2)]
    done = [sid for r in reports for sid in r.slide_id[r.status == "done"]]
    assert len(done) == 4 and len(set(done)) == 4
    assert len(list(folder.glob("*.h5"))) == 4


def test_run_extract_writes_failures_csv_beside_the_features(slides, tmp_path):
    from her2lab.run.extract import run_extract

    hand_manifest(tmp_path, [("good", str(slides / "good.tiff"), ""), ("dpi72", str(slides / "dpi72.tiff"), "")])
    cfg = compose_config("extract", [
        "cohort=custom", f"cohort.manifest={tmp_path / 'manifest.csv'}", f"paths.data_dir={tmp_path / 'data'}",
        "backbone=timm", "backbone.name=resnet18", "backbone.weights=null", "backbone.pretrained=false",
        "backbone.input_px=64", "backbone.target_mpp=2.0", "prepare.qc=false", "num_workers=1",
        f"paths.output_dir={tmp_path / 'out'}",
    ])
    report = run_extract(cfg).set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    folder = tmp_path / "data" / "custom" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    failures = pd.read_csv(folder / "failures.csv")
    assert list(failures.slide_id) == ["dpi72"] and list(failures.stage) == ["prepare"]
    assert "mpp_override" in failures.error[0] and failures.path[0].endswith("dpi72.tiff")
    assert (folder / "good.h5").exists() and not (folder / "dpi72.h5").exists()
