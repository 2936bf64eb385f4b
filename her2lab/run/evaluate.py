"""Evaluation task: a trained run's checkpoint on one split of its cohort, with uncertainty.

Rebuilds the run's data from its own ``config.yaml`` (the same cohort, folds and features — the
splits are checked against the run's ``splits.csv``), loads the checkpoint (the best one unless
``ckpt_path`` says otherwise), tests it, and writes next to each other: ``predictions.csv``,
``metrics.json`` (torchmetrics, as in training, plus the expected calibration error),
``metrics_ci.csv`` (95 % bootstrap intervals resampled by patient), ``roc.png`` and
``calibration.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.errors import Her2labError
from her2lab.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def evaluate(cfg: DictConfig) -> float | None:
    from her2lab.eval.bootstrap import patient_bootstrap
    from her2lab.plots import reliability_png, roc_png
    from her2lab.run.train import _instantiate, build_datamodule, write_predictions

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise Her2labError(f"run_dir={run_dir}: not a training run folder (no config.yaml)")
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        metrics_file = run_dir / "metrics.json"
        ckpt = json.loads(metrics_file.read_text()).get("best_checkpoint") if metrics_file.exists() else None
        if not ckpt:
            raise Her2labError(f"{run_dir}: no best checkpoint recorded (unfinished run?); give ckpt_path=…")
    if not Path(ckpt).is_file():
        raise Her2labError(f"ckpt_path={ckpt}: no such checkpoint")
    out = ensure_writable_dir(_output_dir(cfg), "evaluation folder")
    rcfg = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(rcfg):
        rcfg.paths.output_dir = str(out)
        rcfg.auto_pretrain = False
    pl.seed_everything(int(rcfg.seed), workers=True)
    dm = build_datamodule(rcfg, out)
    net = rcfg.model.get("net") or {}
    if "in_dim" in net and net.in_dim is None:  # runs whose config was saved before the features were read
        net.in_dim = rcfg.backbone.embed_dim
    _same_splits(run_dir / "splits.csv", out / "splits.csv")
    dm.setup("test")
    split = str(cfg.split)
    if split not in ("val", "test"):
        raise Her2labError(f"split={split}: evaluate on val or test (training items are sub-sampled)")
    if split not in dm.datasets:
        raise Her2labError(f"split={split}: the run has splits {sorted(dm.datasets)}")
    module = _instantiate(rcfg.model)
    state = torch.load(ckpt, map_location="cpu", weights_only=False).get("state_dict", {})
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise Her2labError(f"{ckpt}: does not fit the run's model ({str(exc).splitlines()[0][:160]}); "
                           "was it made by another model or encoder?") from None
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.test(module, dataloaders=dm._eval(split))
    metrics = {k.replace("test/", f"{split}/", 1): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics[f"{split}/confusion_matrix"] = module.confusion.compute().tolist()
    metrics.update({"checkpoint": str(ckpt), "run_dir": str(run_dir), "split": split})
    write_predictions(module, dm, rcfg, out / "predictions.csv", split)
    preds = pd.read_csv(out / "predictions.csv").merge(
        pd.read_csv(out / "splits.csv", dtype={"slide_id": str, "patient_id": str})[["slide_id", "patient_id"]], on="slide_id")
    classes = [str(c) for c in rcfg.labels.classes]
    y = preds.label_index.to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    metrics[f"{split}/ece"] = reliability_png(y, probs, out / "calibration.png", title=f"{split}: {run_dir.name}")
    roc_png(y, probs, classes, out / "roc.png", title=f"{split}: {run_dir.name}")
    ci = patient_bootstrap(preds, n=int(cfg.n_boot), seed=int(cfg.seed))
    with atomic_path(out / "metrics_ci.csv") as tmp:
        ci.to_csv(tmp, index=False)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    for r in ci.itertuples():
        log.info("%s %s = %.3f [%.3f, %.3f]", split, r.metric, r.value, r.lo, r.hi)
    log.info("evaluation folder: %s", out)
    return metrics.get(f"{split}/auroc")


def _same_splits(ran: Path, now: Path) -> None:
    if not ran.exists():
        return
    a = pd.read_csv(ran, dtype=str).sort_values("slide_id").reset_index(drop=True)
    b = pd.read_csv(now, dtype=str).sort_values("slide_id").reset_index(drop=True)
    if not a[["slide_id", "split"]].equals(b[["slide_id", "split"]]):
        raise Her2labError(f"the cohort's splits differ from the run's ({ran}): has the manifest changed since training?")
