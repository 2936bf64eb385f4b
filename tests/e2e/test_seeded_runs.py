"""The same seed gives the same model whether the features were extracted in the same process
or read from the cache; localisation names the slides it could not score."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compose_config, save_random_weights
from tests.helpers import eval_config as _eval_cfg
from tests.helpers import train_run as _train

pytestmark = pytest.mark.slow  # every test uses a trained run

# --- same seed, same model --------------------------------------------------------------------------


def _demo(root: Path, out: Path, *overrides: str):
    return compose_config("train", [
        f"paths.data_dir={root / 'data'}", "cohort.synthetic.n_slides=9", "cohort.synthetic.n_pairs=0",
        "cohort.synthetic.width_px=1024", "cohort.synthetic.height_px=768", "cohort.synthetic.mpp=1.0",
        "labels=binary", "data.n_folds=3", "backbone=timm", "backbone.name=test_resnet", "backbone.preset=tr",
        f"backbone.weights={root / 'tr.pt'}", "backbone.input_px=32", "backbone.target_mpp=2.0",
        "data.module.bag_size=8", "data.module.batch_size=2", "trainer.max_epochs=2", "trainer.accelerator=cpu",
        "prepare.qc=false", "logger=csv", f"paths.output_dir={out}", *overrides,
    ])


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict[str, Path]:
    """The same small demo run twice: features extracted in the process, then from the cache."""
    root = tmp_path_factory.mktemp("seed")
    save_random_weights(root / "tr.pt", name="test_resnet")
    _train(_demo(root, root / "extracted"))
    _train(_demo(root, root / "cached"))
    return {"root": root, "extracted": root / "extracted", "cached": root / "cached"}


def test_same_seed_same_metrics_whether_features_were_cached_or_not(demo_runs):
    a, b = demo_runs["extracted"], demo_runs["cached"]
    assert json.loads((a / "features.json").read_text()) == json.loads((b / "features.json").read_text())
    pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    assert list(pa.slide_id) == list(pb.slide_id)
    cols = [c for c in pa.columns if c.startswith("p_")]
    assert np.array_equal(pa[cols].to_numpy(), pb[cols].to_numpy())
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in ("val/auroc_best", "test/auroc", "test/loss", "train/loss"):
        assert ma[k] == mb[k], k


def test_localisation_lists_the_slides_it_could_not_score(demo_runs, tmp_path, caplog):
    """A damaged ground-truth mask (the generator only re-makes missing ones) and slides without
    positive tissue: listed with the reason, and named in a warning."""
    from her2lab.run.evaluate import evaluate

    run = demo_runs["extracted"]
    preds = pd.read_csv(run / "predictions.csv")
    demo = demo_runs["root"] / "data" / "demo"
    score = pd.read_csv(demo / "manifest.csv", dtype=str).set_index("slide_id").her2_score
    positive = next(s for s in preds.slide_id if score[s] != "0")  # a slide with positive tissue
    mask = demo / "masks" / f"{positive}_positive.png"
    good = mask.read_bytes()
    mask.write_bytes(good[: len(good) // 3])  # a truncated PNG
    try:
        with caplog.at_level(logging.WARNING):
            evaluate(_eval_cfg(run, tmp_path / "eval"))
    finally:
        mask.write_bytes(good)
    loc = pd.read_csv(tmp_path / "eval" / "heatmaps" / "localisation.csv", keep_default_na=False).set_index("slide_id")
    assert set(loc.index) == set(preds.slide_id)  # every mapped slide, scored or not
    assert loc.loc[positive, "skipped"] == f"ground-truth mask {mask.name} is not a readable image"
    assert loc.loc[positive, "attention_auroc"] == ""
    zero = {s for s in preds.slide_id if score[s] == "0"}  # nothing to find
    assert all(loc.loc[s, "skipped"] == "no positive tissue under any tile" for s in zero)
    scored = loc[loc.skipped == ""]
    assert set(scored.index) == set(preds.slide_id) - zero - {positive}
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    if len(scored):
        assert m["test/attention_localisation_auroc"] == pytest.approx(scored.attention_auroc.astype(float).mean())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "localisation" in r.getMessage()]
    assert len(warned) == 1 and positive in warned[0] and all(s in warned[0] for s in zero)
