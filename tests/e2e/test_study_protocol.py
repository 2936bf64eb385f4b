"""``experiment=paper_a_*`` runs the H&E-HER2 study's protocol: a sweep over its five folds on a
hand-written cohort (TRIDENT-layout features, ``data.features_dir``), cut down in size only.

One ``python train.py -m experiment=paper_a_hne fold=0,1,2,3,4`` (epochs of 4 × 8 bags drawn
with replacement, 3 epochs, 10 test bags a slide) is made once; the tests read its folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from tests.helpers import compose_config, run_task, write_trident

pytestmark = pytest.mark.slow  # trains five models through train.py

CLASSES = ("0", "1+", "2+", "3+")
N_TILES, DIM, EPOCHS, ITERATIONS, BATCH, N_BAGS = 40, 16, 3, 4, 8, 10


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """20 slides of 15 patients (5 per class), features shifted by class; the sweep folder."""
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    (root / "trident").mkdir()
    rows = []
    for c, score in enumerate(CLASSES):
        for k in range(5):
            for s in range(2 if k == 0 else 1):  # each class: one patient with two slides
                sid = f"s{c}{k}{s}"
                write_trident(root / "trident" / f"{sid}.h5", (rng.standard_normal((N_TILES, DIM)) + 0.4 * c).astype(np.float32))
                rows.append({"slide_id": sid, "patient_id": f"p{c}{k}", "path": f"slides/{sid}.svs", "her2_score": score})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    args = ["-m", "experiment=paper_a_hne", "fold=0,1,2,3,4", *_small(root), f"hydra.sweep.dir={root / 'sweep'}"]
    res = run_task("train.py", *args, cwd=root, log_dir=root / "logs", timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "sweep"


def _small(root: Path) -> list[str]:
    return [
        f"paths.data_dir={root / 'data'}", "cohort=custom", f"cohort.manifest={root / 'manifest.csv'}",
        f"data.features_dir={root / 'trident'}", f"trainer.max_epochs={EPOCHS}", "trainer.accelerator=cpu",
        f"data.module.sampler.iterations={ITERATIONS}", f"data.module.batch_size={BATCH}", "data.module.bag_size=16",
        f"eval.bag_sampling.n_bags={N_BAGS}", "eval.bag_sampling.bag_size=16",
    ]


def _runs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_five_models_trained_on_kfold_slides_test_the_same_held_out_slides(sweep):
    runs = _runs(sweep)
    assert len(runs) == 5
    splits = [pd.read_csv(r / "splits.csv", dtype=str).set_index("slide_id").split for r in runs]
    test = set(splits[0][splits[0] == "test"].index)
    assert test and all(set(s[s == "test"].index) == test for s in splits)
    vals = [set(s[s == "val"].index) for s in splits]
    assert set().union(*vals) == set(splits[0].index) - test and sum(map(len, vals)) == len(splits[0]) - len(test)
    for r in runs:
        assert set(pd.read_csv(r / "predictions.csv", dtype={"slide_id": str}).slide_id) == test
    # the CV summary: mean ± sd over the five models, no pooling of one test set five times
    cv = pd.read_csv(sweep / "cv_summary.csv")
    assert cv.folds_done[0] == 5 and cv["shared test slides"][0] == len(test)
    aurocs = [json.loads((r / "metrics.json").read_text())["test/auroc"] for r in runs]
    assert cv["test/auroc mean"][0] == pytest.approx(np.mean(aurocs))
    assert "(data.cv_protocol=study) is not pooled" in (sweep / "cv_summary.md").read_text()


def test_an_epoch_is_iterations_of_bags_drawn_with_replacement_and_the_last_one_is_tested(sweep):
    run = _runs(sweep)[0]
    m = json.loads((run / "metrics.json").read_text())
    assert m["model_selection"] == "last" and m["best_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    ckpt = torch.load(m["best_checkpoint"], map_location="cpu", weights_only=False)
    # saved when the fit ended: every epoch 4 batches (of 8 bags), whatever the number of training slides
    assert ckpt["global_step"] == EPOCHS * ITERATIONS and m["epochs_trained"] == EPOCHS
    assert any(p.name.startswith("best_epoch") for p in (run / "checkpoints").iterdir())  # best_val's, not tested


def test_eval_reproduces_the_bag_averaged_test_and_can_score_every_tile_instead(sweep, tmp_path):
    from her2lab.run.evaluate import evaluate

    run = _runs(sweep)[0]
    m = json.loads((run / "metrics.json").read_text())
    def cfg(out: str, *overrides: str):
        c = compose_config("eval", [f"run_dir={run}", "n_boot=20", "heatmaps.enabled=false", "report.enabled=false",
                                    *overrides])
        with open_dict(c):
            c.output_dir = str(tmp_path / out)
        return c

    evaluate(cfg("same"))
    e = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert e["checkpoint"] == m["best_checkpoint"]  # the last epoch, as the run tested it
    p_run, p_eval = pd.read_csv(run / "predictions.csv"), pd.read_csv(tmp_path / "same" / "predictions.csv")
    cols = [c for c in p_run.columns if c.startswith("p_")]
    assert np.allclose(p_run[cols], p_eval[cols], atol=1e-6) and e["test/auroc"] == pytest.approx(m["test/auroc"], abs=1e-6)
    evaluate(cfg("whole", "bag_sampling={enabled:false}"))
    p_whole = pd.read_csv(tmp_path / "whole" / "predictions.csv")
    assert not np.allclose(p_run[cols], p_whole[cols], atol=1e-4)  # one prediction from all 40 tiles differs
