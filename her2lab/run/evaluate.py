"""The evaluation task: a trained run's checkpoint on one split of its cohort, or on a new cohort,
with uncertainty.

Rebuilds the run's inputs from its own ``config.yaml`` (the same cohort, folds and features: the
splits are checked against the run's ``splits.csv``; a new cohort is checked by
:mod:`her2lab.eval.external`), loads the checkpoint (the best one unless ``ckpt_path`` says
otherwise), tests it, and writes next to each other: ``predictions.csv``, ``metrics.json``
(torchmetrics, as in training, plus the expected calibration error), ``metrics_ci.csv`` (95 %
bootstrap intervals resampled by patient), ``curves.png`` (ROC and precision-recall),
``calibration.png`` and ``confusion_matrix.png``; then the inputs' explanations (attention maps
for MIL runs, Grad-CAM for thumbnail runs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.checkpoint import check_fits, check_targets, load_checkpoint
from her2lab.config import build
from her2lab.data.bags import write_excluded_tiles
from her2lab.data.cohort_config import resolve_cohort
from her2lab.data.inputs import inputs_for
from her2lab.errors import Her2labError
from her2lab.eval.bootstrap import patient_bootstrap
from her2lab.eval.external import (
    eval_split,
    not_seen_in_training,
    same_features,
    same_splits,
    use_new_cohort,
)
from her2lab.eval.run_folder import best_checkpoint, require_run_dir, write_json, write_predictions
from her2lab.io import atomic_path, ensure_writable_dir
from her2lab.lit.noise import quiet_third_party
from her2lab.plots import confusion_png, curves_png, reliability_png
from her2lab.progress import on_terminal
from her2lab.run.explanations import explain_tested
from her2lab.run.loggers import log_wandb_eval

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluation made: its folder, the run config it used (pointed at the evaluated
    cohort), its metrics and the explanations' table."""

    out: Path
    run_cfg: DictConfig
    metrics: dict
    split: str


def evaluate(cfg: DictConfig) -> float | None:
    """Evaluate one run; returns the split's macro AUROC (None without labelled slides)."""
    return run_evaluation(cfg).metrics.get(f"{eval_split(cfg)}/auroc")


def run_evaluation(cfg: DictConfig) -> Evaluation:
    """Evaluate one run (see the module's docstring); unlabelled slides of a new cohort are
    predicted and enter no metric."""
    run_dir = require_run_dir(cfg.get("run_dir"), cfg.get("ckpt_path"))
    ckpt = cfg.get("ckpt_path") or best_checkpoint(run_dir)
    state = load_checkpoint(ckpt)["state_dict"]  # as data only, before any work: a file that would run code is refused
    rcfg = OmegaConf.load(run_dir / "config.yaml")
    check_targets(rcfg, run_dir / "config.yaml", cfg.get("allow_targets") or ())
    split = eval_split(cfg)
    external = split == "external"
    ran_cohort = use_new_cohort(cfg, rcfg) if external else None
    out = ensure_writable_dir(_output_dir(cfg), "evaluation folder")
    with open_dict(rcfg):
        rcfg.paths.output_dir = str(out)
        rcfg.auto_pretrain = False
        if cfg.get("bag_sampling") is not None:  # eval.py's own setting wins over the run's
            rcfg.eval = OmegaConf.merge(rcfg.get("eval") or {}, {"bag_sampling": cfg.bag_sampling})
        if external and (rcfg.get("extract") or {}).get("augment_views"):
            rcfg.extract.augment_views = 0  # new slides are only scored: no augmented views to embed
        if external and cfg.get("missing_slides"):  # unreadable new slides: listed and left out, the rest scored
            rcfg.data.missing_slides = str(cfg.missing_slides)
    if external:  # before any slide work: the new cohort must be new to the model
        not_seen_in_training(run_dir, ran_cohort, rcfg.cohort, resolve_cohort(rcfg.cohort, int(rcfg.get("num_workers", 1)),
                                                                                   allow_unlabelled=True))
    pl.seed_everything(int(rcfg.seed), workers=True)
    inputs = inputs_for(rcfg)
    dm = inputs.datamodule(out)
    net = rcfg.model.get("net") or {}
    if "in_dim" in net and net.in_dim is None:  # runs whose config was saved before the features were read
        net.in_dim = rcfg.backbone.embed_dim
    if not external:
        same_splits(run_dir / "splits.csv", out / "splits.csv")
    same_features(run_dir / "features.json", out / "features.json")
    dm.setup("test")
    write_excluded_tiles(dm, out / "excluded_tiles.csv")  # tiles left out for non-finite features (data.nonfinite)
    ds = "test" if external else split
    if ds not in dm.datasets:
        raise Her2labError(f"split={split}: no slides in it (the run's cohort has {sorted(dm.datasets)})")
    module = build(rcfg.model)
    check_fits(module, state, ckpt)
    module.load_state_dict(state)
    quiet_third_party()
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         enable_progress_bar=on_terminal())  # in a batch job: log lines only
    # the test split as training scored it (eval.bag_sampling: random bags per slide, averaged);
    # on a terminal Lightning's table of the metrics, else score() logs them
    trainer.test(module, dataloaders=dm.test_dataloader() if ds == "test" else dm._eval(ds), verbose=on_terminal())
    metrics = {k.replace("test/", f"{split}/", 1): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics[f"{split}/confusion_matrix"] = module.confusion.compute().tolist()
    metrics.update({"checkpoint": str(ckpt), "run_dir": str(run_dir), "split": split, "cohort": str(rcfg.cohort.name),
                    f"{split}/slides": len(dm.datasets[ds])})
    classes = [str(c) for c in rcfg.labels.classes]
    write_predictions(module.test_outputs, dm.datasets[ds].records, list(rcfg.labels.classes), rcfg.fold,
                      out / "predictions.csv")
    preds = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str, "label": str}, keep_default_na=False).merge(
        pd.read_csv(out / "splits.csv", dtype={"slide_id": str, "patient_id": str})[["slide_id", "patient_id"]], on="slide_id")
    labelled = preds[preds.label_index >= 0]
    if len(labelled) < len(preds):
        metrics[f"{split}/slides_unlabelled"] = len(preds) - len(labelled)
        log.info("%d of %d slide(s) have no HER2 score: predicted, in no metric", len(preds) - len(labelled), len(preds))
    if len(labelled):
        ci = figures_and_intervals(cfg, labelled, classes, metrics, out,
                                   title=f"{split}: {run_dir.name}" + (f" on {rcfg.cohort.name}" if external else ""))
    else:
        ci = pd.DataFrame(columns=["metric", "value", "lo", "hi", "n_boot"])
        metrics.pop(f"{split}/confusion_matrix", None)
    write_json(out / "metrics.json", metrics)  # before the explanations: their failure loses nothing
    shown = explain_tested(inputs, module, dm.datasets[ds], rcfg, out, cfg.get("heatmaps"))
    if shown.metrics:
        metrics.update({f"{split}/{k}": v for k, v in shown.metrics.items()})
        write_json(out / "metrics.json", metrics)
    if (cfg.get("wandb") or {}).get("enabled", False):
        log_wandb_eval(cfg.wandb, rcfg, run_dir, out, metrics, preds, classes, ci, shown.table)
    for r in ci.itertuples():
        log.info("%s %s = %.3f [%.3f, %.3f]", split, r.metric, r.value, r.lo, r.hi)
    log.info("evaluation folder: %s", out)
    return Evaluation(out=out, run_cfg=rcfg, metrics=metrics, split=split)


def figures_and_intervals(cfg: DictConfig, preds: pd.DataFrame, classes: list[str], metrics: dict, out: Path,
                           title: str) -> pd.DataFrame:
    """Calibration (ECE into ``metrics``), ROC/PR curves, confusion matrix, and the patient-bootstrap
    intervals (``metrics_ci.csv``, returned)."""
    split = metrics["split"]
    y = preds.label_index.to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    metrics[f"{split}/ece"] = reliability_png(y, probs, out / "calibration.png", title=title)
    curves_png(y, probs, classes, out / "curves.png", title=title)
    confusion_png(metrics[f"{split}/confusion_matrix"], classes, out / "confusion_matrix.png", title=title)
    ci = patient_bootstrap(preds, n=int(cfg.n_boot), seed=int(cfg.seed))
    with atomic_path(out / "metrics_ci.csv") as tmp:
        ci.to_csv(tmp, index=False)
    return ci


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) if cfg.get("output_dir") else Path(HydraConfig.get().runtime.output_dir)
