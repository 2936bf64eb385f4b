"""What scoring reads before any model runs: a folder of slide files, the models of a sweep, the ensemble."""

import json

import numpy as np
import pandas as pd
import pytest

from her2lab.errors import Her2labError
from her2lab.eval.run_folder import eval_dir
from her2lab.run.predict import (
    ensemble,
    model_runs,
    safe_slide_id,
    slides_cohort_name,
    slides_manifest,
)


def test_a_folder_of_slides_becomes_an_unlabelled_manifest(tmp_path):
    src = tmp_path / "scanner export"
    src.mkdir()
    for name in ("B-12 HER2.svs", "case#7?.ndpi", "x.ome.tiff", "readme.txt", ".hidden.svs"):
        (src / name).write_bytes(b"x")
    (src / "sub").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    table = pd.read_csv(slides_manifest(str(src), out), dtype=str, keep_default_na=False)
    assert sorted(table.slide_id) == ["B-12 HER2", "_hidden", "case_7_", "x.ome"]
    assert (table.her2_score == "").all() and (table.patient_id == table.slide_id).all()
    assert all(p.startswith(str(src)) for p in table.path)
    # a glob, and one file
    assert len(pd.read_csv(slides_manifest(str(src / "*.ndpi"), out))) == 1
    assert len(pd.read_csv(slides_manifest(str(src / "x.ome.tiff"), out))) == 1


def test_bad_slide_folders_are_one_line_errors(tmp_path):
    with pytest.raises(Her2labError, match="no such folder or file"):
        slides_manifest(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Her2labError, match="no slide file in it"):
        slides_manifest(str(tmp_path / "empty"), tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.svs").write_bytes(b"x")
    (two / "A.tiff").write_bytes(b"x")
    with pytest.raises(Her2labError, match="would both be slide"):
        slides_manifest(str(two), tmp_path)


def test_slide_ids_and_cache_names_are_safe(tmp_path):
    assert safe_slide_id("../../etc/passwd") == "_._.._etc_passwd"  # no separator, no leading dot
    assert slides_cohort_name(str(tmp_path)) != slides_cohort_name(str(tmp_path / "x"))
    (tmp_path / "my folder").mkdir()
    assert eval_dir(str(tmp_path), None, None, None, str(tmp_path / "my folder")).endswith("eval/slides-my_folder")


def _job(sweep, name, status, ckpt=True):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / "config.yaml").write_text("labels: {classes: ['0', '1']}\ndata: {_target_: x}\nbackbone: {name: r18}\n")
    if status == "done":
        (job / "metrics.json").write_text(json.dumps({"best_checkpoint": str(job / "best.ckpt") if ckpt else None}))
    if status == "failed":
        (job / "failed.txt").write_text("CUDA out of memory\n")
    return job


def test_a_sweeps_finished_models_and_the_rest_named(tmp_path):
    sweep = tmp_path / "sweep"
    done = _job(sweep, "0", "done")
    _job(sweep, "1", "failed")
    _job(sweep, "2", "unfinished")
    _job(sweep, "3", "done", ckpt=False)
    runs, left = model_runs(str(sweep), None)
    assert runs == [done]
    assert left == {"1": "CUDA out of memory", "2": "unfinished", "3": "no best checkpoint recorded"}
    assert model_runs(str(done), None) == ([done], {})
    (done / "metrics.json").unlink()
    with pytest.raises(Her2labError, match=r"no finished model in this sweep \(job 0: unfinished; job 1: CUDA"):
        model_runs(str(sweep), None)
    with pytest.raises(Her2labError, match="not a training run folder"):
        model_runs(str(tmp_path), None)


def test_a_sweep_over_settings_is_not_one_ensemble(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, "0", "done")
    other = _job(sweep, "1", "done")
    (other / "config.yaml").write_text("labels: {classes: ['0', '1']}\ndata: {_target_: x}\nbackbone: {name: uni}\n")
    with pytest.raises(Her2labError, match="the sweep's models differ"):
        model_runs(str(sweep), None)


def test_ensemble_means_probabilities_and_reports_spread_and_agreement():
    a = pd.DataFrame({"slide_id": ["s1", "s2"], "label": ["", "1"], "label_index": [-1, 1], "p_0": [0.9, 0.2], "p_1": [0.1, 0.8]})
    b = a.assign(p_0=[0.3, 0.4], p_1=[0.7, 0.6])
    c = a.assign(p_0=[0.6, 0.3], p_1=[0.4, 0.7])
    e = ensemble([a, b, c], ["0", "1"]).set_index("slide_id")
    assert e.loc["s1", "p_0"] == pytest.approx(0.6) and e.loc["s1", "pred"] == "0"
    assert e.loc["s1", "spread"] == pytest.approx(np.std([0.9, 0.3, 0.6]))
    assert e.loc["s1", "agreement"] == pytest.approx(2 / 3) and e.loc["s2", "agreement"] == 1.0
    assert e.loc["s1", "label_index"] == -1 and (e.n_models == 3).all()
