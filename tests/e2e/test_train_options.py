"""Training options on one shared small cohort: resume, ordinal head, TensorBoard, missing
features, DDP on two CPU processes, Optuna and submitit sweeps.

The cohort (12 real synthetic slides) and its ResNet-18 features (random weights, 64 px at
2 µm/px) are made once; every run here reuses them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from her2lab.errors import Her2labError
from tests.helpers import compose_config, run_task, save_random_weights

pytestmark = pytest.mark.slow  # every test trains (in-process or through train.py)


def _base(root: Path) -> list[str]:
    return [
        f"paths.data_dir={root / 'data'}", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0",
        "data.n_folds=3", "backbone=timm", "backbone.name=resnet18", f"backbone.weights={root / 'r18.pt'}",
        "backbone.preset=r18", "backbone.input_px=64", "backbone.target_mpp=2.0", "data.module.bag_size=16",
        "prepare.qc=false",
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Data folder with the 12-slide H&E demo cohort, its tiles and features."""
    from her2lab.run.extract import run_extract

    root = tmp_path_factory.mktemp("options")
    save_random_weights(root / "r18.pt")
    report = run_extract(_compose(root, root / "extract"))
    assert (report.status == "done").sum() == 12
    return root


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    """The default model trained for 3 epochs, as job 0 of a multirun folder (``sweep7``); the
    evaluation tests read it and write their outputs elsewhere."""
    run = tmp_path_factory.mktemp("trained") / "sweep7" / "0"
    _train(cohort, run, "trainer.max_epochs=3")
    return run


def _compose(root: Path, out: Path, *overrides: str):
    return compose_config("train", [*_base(root), f"paths.output_dir={out}", *overrides])


def _train(root: Path, out: Path, *overrides: str) -> dict:
    from her2lab.run.train import train

    train(_compose(root, out, *overrides))
    return json.loads((out / "metrics.json").read_text())


def _subprocess(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_task("train.py", *_base(root), *args, cwd=root, log_dir=root / "logs", timeout=timeout)


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_from_checkpoint_continues_where_it_stopped(cohort, tmp_path):
    nodrop = ["model.net.dropout=0.0"]
    _train(cohort, tmp_path / "full", "trainer.max_epochs=4", *nodrop)
    _train(cohort, tmp_path / "half", "trainer.max_epochs=2", *nodrop)
    half = tmp_path / "half" / "checkpoints" / "last.ckpt"
    m = _train(cohort, tmp_path / "resumed", "trainer.max_epochs=4", f"ckpt_path={half}", *nodrop)
    assert m["epochs_trained"] == 4
    ck = {k: torch.load(tmp_path / k / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for k in ("full", "resumed")}
    assert ck["resumed"]["global_step"] == ck["full"]["global_step"] and ck["resumed"]["epoch"] == ck["full"]["epoch"]
    adam = [c["optimizer_states"][0]["state"][0]["step"] for c in ck.values()]
    assert float(adam[0]) == float(adam[1])  # the optimiser state came along
    # Same bags in the same order: the resumed weights land where the uninterrupted run's did
    # (up to float noise, which Adam's normalised steps can lift to ~lr), far closer than the
    # half-way weights are.
    full, resumed, mid = ck["full"]["state_dict"], ck["resumed"]["state_dict"], _state(half)
    assert full.keys() == resumed.keys()
    dist = lambda a, b: sum(float((a[k] - b[k]).abs().sum()) for k in a)  # noqa: E731
    assert dist(full, resumed) < 0.05 * dist(full, mid)
    # the resumed run trained epochs 2 and 3 only
    log = pd.read_csv(tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv")
    assert set(log.epoch[log["train/loss"].notna()].astype(int)) == {2, 3}
    # the validation metrics of the selected epoch, even one from before the resume
    before = pd.read_csv(tmp_path / "half" / "csv" / "version_0" / "metrics.csv")
    val = pd.concat([before, log]).dropna(subset=["val/auroc"])
    val = val.drop_duplicates("epoch", keep="last").set_index("epoch")
    assert sorted(val.index.astype(int)) == [0, 1, 2, 3]
    assert m["val/auroc"] == pytest.approx(val.loc[m["selected_epoch"], "val/auroc"], abs=1e-6)
    assert m["val/loss"] == pytest.approx(val.loc[m["selected_epoch"], "val/loss"], abs=1e-6)


def test_ordinal_head_trains_and_predicts_probabilities(cohort, tmp_path):
    m = _train(cohort, tmp_path, "model.net.ordinal=true", "trainer.max_epochs=2")
    preds = pd.read_csv(tmp_path / "predictions.csv")
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    assert probs.shape[1] == 4 and (probs >= 0).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert 0 <= m["test/auroc"] <= 1 and "test/qwk" in m
    head = _state(tmp_path / "checkpoints" / "last.ckpt")
    assert "net.classifier.gaps" in head  # the cumulative-logit head, not a linear one


def test_tensorboard_logger_holds_the_metrics(cohort, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = _train(cohort, tmp_path, "logger=tensorboard", "trainer.max_epochs=2")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/auroc", "test/auroc"} <= tags
    assert acc.Scalars("test/auroc")[-1].value == pytest.approx(m["test/auroc"], abs=1e-6)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_slide_without_features_is_an_error_or_dropped_and_listed(cohort, tmp_path):
    src = next((cohort / "data" / "demo" / "features").glob("*/r18"))
    feats = tmp_path / "feats"
    shutil.copytree(src, feats)
    gone = sorted(feats.glob("*.h5"))[0]
    gone.unlink()
    with pytest.raises(Her2labError, match=rf"1 slide\(s\) of the manifest have no features .*{gone.stem}.*data.missing_slides=drop"):
        _train(cohort, tmp_path / "a", f"data.features_dir={feats}", "trainer.max_epochs=1")
    _train(cohort, tmp_path / "b", f"data.features_dir={feats}", "data.missing_slides=drop", "trainer.max_epochs=1")
    excluded = pd.read_csv(tmp_path / "b" / "excluded_slides.csv")
    assert list(excluded.slide_id) == [gone.stem]
    assert gone.stem not in set(pd.read_csv(tmp_path / "b" / "predictions.csv").slide_id)


def test_class_weights_of_the_wrong_length_are_an_error(cohort, tmp_path):
    with pytest.raises(Her2labError, match="class_weights has 2 values for 4 classes"):
        _train(cohort, tmp_path, "model.class_weights=[1.0,2.0]", "trainer.max_epochs=1")


def test_ddp_on_two_cpu_processes_gives_the_metrics_of_one(cohort, tmp_path):
    # The same global batch either way: 1 process × 8 bags, or 2 processes × 4 bags (DDP averages
    # the two halves' gradients). Dropout off, so the ranks' random streams do not matter.
    common = ["model.net.dropout=0.0", "trainer.max_epochs=3", "trainer.accelerator=cpu", "data.module.eval_batch_size=2"]
    one = _subprocess(cohort, *common, "data.module.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _subprocess(cohort, *common, "trainer=ddp", "trainer.devices=2", "data.module.batch_size=4",
                      f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for k in ("val/auroc_best", "test/auroc", "test/acc", "test/f1", "test/qwk", "test/loss"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k
    assert m2["test/confusion_matrix"] == m1["test/confusion_matrix"]
    p1 = pd.read_csv(tmp_path / "one" / "predictions.csv")
    p2 = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert list(p1.slide_id) == list(p2.slide_id)  # every test slide once, gathered from both ranks
    cols = [c for c in p1.columns if c.startswith("p_")]
    assert np.allclose(p1[cols], p2[cols], atol=1e-4)


def test_optuna_search_runs_trials_and_reports_the_best(cohort, tmp_path):
    res = _subprocess(cohort, "hparams_search=abmil_optuna", "hydra.sweeper.n_trials=3",
                      "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=2", f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    vals = [json.loads((tmp_path / str(i) / "metrics.json").read_text())["val/auroc_best"] for i in range(3)]
    assert best["best_value"] == pytest.approx(max(vals))
    # bag_size is fixed on the command line here, and a command-line value wins over the search space
    assert set(best["best_params"]) >= {"model.optimizer.lr", "model.net.hidden_dim"}
    assert "data.module.bag_size" not in best["best_params"]


def test_submitit_local_launcher_runs_training_jobs(cohort, tmp_path):
    res = _subprocess(cohort, "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "fold=0,1",
                      "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for i in (0, 1):
        m = json.loads((tmp_path / str(i) / "metrics.json").read_text())
        assert 0 <= m["test/auroc"] <= 1
    assert list(tmp_path.glob(".submitit/*/*_log.out"))  # the jobs ran through submitit


def test_a_failed_sweep_job_does_not_stop_the_others_and_is_summarised(cohort, tmp_path):
    res = _subprocess(cohort, "hydra.mode=MULTIRUN", "fold=7,0", "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}")
    assert res.returncode != 0  # the sweep as a whole reports the failure
    assert "error: fold=7 is out of range: use 0..2" in res.stderr
    summary = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert list(summary.status) == ["failed", "done"]
    assert summary.error[0].startswith("fold=7 is out of range") and "fold=7" in summary.overrides[0]
    assert 0 <= summary["test/auroc"][1] <= 1 and (tmp_path / "1" / "metrics.json").exists()


@pytest.mark.parametrize("model", ["meanpool", "maxpool"])
def test_pooling_baselines_train_and_test(cohort, tmp_path, model):
    m = _train(cohort, tmp_path, f"model={model}", "trainer.max_epochs=2")
    assert 0 <= m["test/auroc"] <= 1 and len(pd.read_csv(tmp_path / "predictions.csv")) == 4


def test_eval_reproduces_the_run_and_adds_uncertainty(cohort, trained, tmp_path):
    from omegaconf import OmegaConf

    from her2lab.run.evaluate import evaluate

    run = trained
    m = json.loads((run / "metrics.json").read_text())
    cfg = OmegaConf.create({"run_dir": str(run), "ckpt_path": None, "split": "test", "n_boot": 200, "seed": 0,
                            "output_dir": str(tmp_path / "eval")})
    evaluate(cfg)
    e = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for k in ("test/auroc", "test/acc", "test/f1", "test/qwk", "test/loss"):
        assert e[k] == pytest.approx(m[k], abs=1e-6), k
    assert e["test/confusion_matrix"] == m["test/confusion_matrix"] and 0 <= e["test/ece"] <= 1
    p_run, p_eval = pd.read_csv(run / "predictions.csv"), pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(p_run.slide_id) == list(p_eval.slide_id)
    cols = [c for c in p_run.columns if c.startswith("p_")]
    assert np.allclose(p_run[cols], p_eval[cols], atol=1e-6)
    ci = pd.read_csv(tmp_path / "eval" / "metrics_ci.csv").set_index("metric")
    assert ci.loc["auroc", "value"] == pytest.approx(m["test/auroc"], abs=1e-6)
    assert ci.loc["auroc", "lo"] <= ci.loc["auroc", "value"] <= ci.loc["auroc", "hi"]
    for png in ("curves.png", "calibration.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 0
    # attention maps for every test slide, and their localisation against the generator's truth
    hm = tmp_path / "eval" / "heatmaps"
    for sid in p_eval.slide_id:
        for f in (f"{sid}_heatmap.png", f"{sid}_evidence.png", f"{sid}_tiles.png", f"{sid}.geojson"):
            assert (hm / f).stat().st_size > 0, f
    loc = pd.read_csv(hm / "localisation.csv")
    assert set(loc.slide_id) == set(p_eval.slide_id)
    for k in ("attention_auroc", "tile_score_auroc"):
        assert loc[k][loc.label != "0"].notna().all() and loc[k][loc.label == "0"].isna().all()  # 0: nothing to find
    # a checkpoint of another model is a clear error, not a silent re-initialisation
    other = tmp_path / "other"
    _train(cohort, other, "model=meanpool", "trainer.max_epochs=1")
    bad = OmegaConf.merge(cfg, {"ckpt_path": str(next((other / "checkpoints").glob("best_*.ckpt"))), "output_dir": str(tmp_path / "e2")})
    with pytest.raises(Her2labError, match="does not fit the run's model"):
        evaluate(bad)


def _eval_cfg(run: Path, out: Path, *overrides: str):
    from omegaconf import open_dict

    cfg = compose_config("eval", [f"run_dir={run}", "n_boot=50", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_eval_on_a_new_cohort_with_wandb(cohort, trained, tmp_path, monkeypatch):
    """External validation: every slide of another cohort, embedded with the run's own encoder;
    the evaluation lands in W&B (offline) next to the run; leaks and mismatches are refused."""
    from her2lab.run.evaluate import evaluate
    from her2lab.run.extract import run_extract

    run = trained  # a job of a multirun: its eval joins the sweep's W&B group
    (run.parent / "multirun.yaml").write_text("hydra: {}\n")
    ext = ["cohort=demo_external", "cohort.synthetic.n_slides=6"]
    out = tmp_path / "ext"
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    evaluate(_eval_cfg(run, out, *ext, "wandb.enabled=true", "heatmaps.limit=2"))
    preds = pd.read_csv(out / "predictions.csv")
    manifest = pd.read_csv(cohort / "data" / "demo_external" / "manifest.csv")
    assert sorted(preds.slide_id) == sorted(manifest.slide_id) and len(preds) == 6  # the whole new cohort
    assert set(pd.read_csv(out / "splits.csv").split) == {"test"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "external" and m["cohort"] == "demo_external" and m["external/slides"] == 6
    assert 0 <= m["external/auroc"] <= 1 and "external/ece" in m and "external/attention_localisation_auroc" in m
    assert json.loads((out / "features.json").read_text())["folder"].startswith(str(cohort / "data" / "demo_external"))
    for f in ("curves.png", "calibration.png", "confusion_matrix.png", "metrics_ci.csv"):
        assert (out / f).stat().st_size > 0, f
    assert len(list((out / "heatmaps").glob("*_heatmap.png"))) == 2
    wb = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wb) == 1  # one offline eval run, ready for `wandb sync`
    data = wb[0].read_bytes()
    for key in (b"external/auroc", b"external/confusion_matrix", b"external/roc", b"external/pr", b"external/predictions",
                b"external/metrics_ci", b"external/heatmaps", b"external/curves_png", b"demo_external"):
        assert key in data, key
    assert b"eval" in data and b"train-sweep7" in data  # job type, and the training sweep's group
    # bad input: the run's own cohort, another stain, a subset split, features of another encoder, seen slides
    with pytest.raises(Her2labError, match="the run's own cohort"):
        evaluate(_eval_cfg(run, tmp_path / "e1", "cohort=demo"))
    with pytest.raises(Her2labError, match="trained on hne slides but cohort demo_ihc is ihc"):
        evaluate(_eval_cfg(run, tmp_path / "e2", "cohort=demo_ihc"))
    with pytest.raises(Her2labError, match="evaluated whole"):
        evaluate(_eval_cfg(run, tmp_path / "e3", *ext, "split=val"))
    save_random_weights(tmp_path / "other.pt", seed=1)
    report = run_extract(_compose(cohort, tmp_path / "x", *ext, f"backbone.weights={tmp_path / 'other.pt'}", "backbone.preset=r18b"))
    assert (report.status == "done").sum() == 6
    other = next((cohort / "data" / "demo_external" / "features").glob("*/r18b"))
    with pytest.raises(Her2labError, match="made differently.*encoder_weights_sha256"):
        evaluate(_eval_cfg(run, tmp_path / "e4", *ext, f"features_dir={other}"))
    seen = pd.read_csv(cohort / "data" / "demo" / "manifest.csv")
    seen["path"] = [str(cohort / "data" / "demo" / p) for p in seen.path]
    seen.to_csv(tmp_path / "seen.csv", index=False)
    with pytest.raises(Her2labError, match="slide\\(s\\) the run trained or validated on"):
        evaluate(_eval_cfg(run, tmp_path / "e5", "cohort=custom", f"cohort.manifest={tmp_path / 'seen.csv'}"))


def test_eval_py_command_line(trained, tmp_path):
    run = trained
    best = next((run / "checkpoints").glob("best_*.ckpt"))  # the run folder is found from the checkpoint
    res = run_task("eval.py", f"ckpt_path={best}", "split=val", "n_boot=50", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = next((run / "eval").glob("val-*"))
    m = json.loads((out / "metrics.json").read_text())
    assert "val/auroc" in m and (out / "predictions.csv").exists() and (out / "metrics_ci.csv").exists()
    res = run_task("eval.py", f"run_dir={run}", "cohort=demo_external", "cohort.synthetic.n_slides=6", "n_boot=20",
                   "heatmaps.enabled=false", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = next((run / "eval").glob("external-demo_external-*"))
    assert len(pd.read_csv(out / "predictions.csv")) == 6 and "external/auroc" in json.loads((out / "metrics.json").read_text())
    res = run_task("eval.py", f"run_dir={tmp_path / 'nope'}", cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and "not a training run folder" in res.stderr.strip().splitlines()[-1]
    res = run_task("eval.py", cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and "give run_dir=" in res.stderr.strip().splitlines()[-1]


def test_attention_finds_the_positive_tissue_better_than_a_random_ranking(tmp_path):
    """IHC slides, a ResNet-18 (random weights still see DAB's brown), ABMIL for 2+/3+ vs 0/1+:
    attention ranks the tiles of the generator's positive regions first."""
    from omegaconf import OmegaConf

    from her2lab.run.evaluate import evaluate

    save_random_weights(tmp_path / "r18.pt")
    # The best epoch by validation loss: 4 validation slides reach AUROC 1.0 in the first epoch or
    # two, and the first such epoch is a barely trained model whose tile scores depend on its draw.
    ihc = ["cohort=demo_ihc", "cohort.synthetic.n_slides=16", "labels=binary", "data.n_folds=4", "trainer.max_epochs=30",
           "model.net.dropout=0.0", "data.module.bag_size=null", "callbacks.model_checkpoint.monitor=val/loss",
           "callbacks.model_checkpoint.mode=min"]
    m = _train(tmp_path, tmp_path / "run", *ihc)
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "ckpt_path": None, "split": "test", "n_boot": 10, "seed": 0,
                            "output_dir": str(tmp_path / "eval"), "heatmaps": {"limit": None}})
    evaluate(cfg)
    loc = pd.read_csv(tmp_path / "eval" / "heatmaps" / "localisation.csv")
    e = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print("localisation", loc.to_dict("records"), m["test/auroc"])
    assert loc.tile_score_auroc.notna().sum() >= 2
    assert e["test/tile_score_localisation_auroc"] == pytest.approx(loc.tile_score_auroc.mean())
    assert loc.tile_score_auroc.mean() > 0.6  # a random ranking gives 0.5
