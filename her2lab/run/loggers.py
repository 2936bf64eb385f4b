"""Loggers for training and evaluation: CSV, TensorBoard and W&B from the ``logger`` group, the W&B
group a run (or a whole sweep) lands in, and the charts, tables and pictures logged at test time.

W&B runs are offline unless configured otherwise; :func:`finish_loggers` always closes them, so a
crashed run never leaks into the next multirun job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.config import build

log = logging.getLogger(__name__)


def sweep_group(cfg: DictConfig) -> str:
    """W&B group when none is given: the task, plus the sweep folder's name in a multirun, so
    every job of one sweep lands in one group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return wandb_group(cfg.task_name, Path(hc.runtime.output_dir).parent)
    except ValueError:  # not launched by Hydra (compose API)
        pass
    return wandb_group(cfg.task_name, None)


def wandb_group(task_name: str, sweep_dir: Path | None) -> str:
    """The task's name, plus the sweep folder's name for the jobs of a multirun."""
    return f"{task_name}-{sweep_dir.name}" if sweep_dir is not None else str(task_name)


def instantiate_loggers(cfg: DictConfig) -> list:
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        _require_extra(str(c.get("_target_", "")))
        if "WandbLogger" in str(c.get("_target_", "")) and not c.get("group"):
            c = OmegaConf.merge(c, {"group": sweep_group(cfg)})
        lg = build(c)
        loggers.append(lg)
    return loggers


def _require_extra(target: str) -> None:
    """A logger whose package is an optional extra: a one-line error naming the extra."""
    import importlib.util

    from her2lab.errors import Her2labError

    if "TensorBoardLogger" in target and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        raise Her2labError("logger=tensorboard needs TensorBoard: pip install 'her2lab[tensorboard]'")


def log_wandb_test(loggers: list, module, class_names: list[str], predictions: Path, images: list[Path] = ()) -> None:
    """Test results as W&B charts and a table: confusion matrix, ROC curves, one row per slide,
    and pictures (Grad-CAM overlays)."""
    outs = sorted(getattr(module, "test_outputs", None) or [], key=lambda o: o["index"])
    wb = [lg for lg in loggers if lg.__class__.__name__ == "WandbLogger"]
    if not outs or not wb:
        return
    import wandb

    y = [o["label"] for o in outs]
    probs = [o["probs"] for o in outs]
    pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    table = wandb.Table(dataframe=pd.read_csv(predictions)) if predictions.exists() else None
    for lg in wb:
        logs = {"test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y, preds=pred, class_names=class_names),
                "test/roc": wandb.plot.roc_curve(y, probs, labels=class_names)}
        if table is not None:
            logs["test/predictions"] = table
        if images:
            logs["test/gradcam"] = [wandb.Image(str(p), caption=p.stem) for p in images]
        lg.experiment.log(logs)


def run_group(rcfg: DictConfig, run_dir: Path) -> str:
    """The W&B group the training run logged to: its configured group, else its task (plus its
    sweep folder when it was a multirun job, as training names it)."""
    group = ((rcfg.get("logger") or {}).get("wandb") or {}).get("group")
    if group:
        return str(group)
    sweep = run_dir.parent if (run_dir.parent / "multirun.yaml").exists() else None
    return wandb_group(str(rcfg.task_name), sweep)


def log_wandb_eval(wcfg: DictConfig, rcfg: DictConfig, run_dir: Path, out: Path, metrics: dict, preds: pd.DataFrame,
                   classes: list[str], ci: pd.DataFrame, loc: pd.DataFrame | None) -> None:
    """One W&B run (job type ``eval``) in the training run's group: the metrics, their bootstrap
    intervals, confusion matrix, ROC and PR charts, the per-slide table, the pictures and heatmaps.
    Offline by default: ``wandb sync <eval folder>/wandb/offline-run-*`` uploads it later."""
    import wandb

    split = metrics["split"]
    cohort = f"-{metrics['cohort']}" if split == "external" else ""
    run = wandb.init(
        project=str(wcfg.get("project", "her2lab")), group=wcfg.get("group") or run_group(rcfg, run_dir), job_type="eval",
        name=f"eval-{run_dir.name}-{split}{cohort}", dir=str(out), mode="offline" if wcfg.get("offline", True) else "online",
        tags=[str(t) for t in wcfg.get("tags") or []],
        config={"run_dir": str(run_dir), "checkpoint": metrics["checkpoint"], "split": split, "cohort": metrics["cohort"],
                "run": OmegaConf.to_container(rcfg, resolve=True)},
    )
    try:
        y = preds.label_index.tolist()
        probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
        logs: dict = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        logs[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=y, preds=probs.argmax(1).tolist(), class_names=classes)
        logs[f"{split}/roc"] = wandb.plot.roc_curve(y, probs, labels=classes)
        logs[f"{split}/pr"] = wandb.plot.pr_curve(y, probs, labels=classes)
        logs[f"{split}/predictions"] = wandb.Table(dataframe=preds)
        logs[f"{split}/metrics_ci"] = wandb.Table(dataframe=ci)
        for png in ("curves", "calibration", "confusion_matrix"):
            if (out / f"{png}.png").exists():
                logs[f"{split}/{png}_png"] = wandb.Image(str(out / f"{png}.png"))
        n = int(wcfg.get("images", 16))
        for key, pattern in (("heatmaps", "heatmaps/*_heatmap.png"), ("evidence", "heatmaps/*_evidence.png"),
                             ("tiles", "heatmaps/*_tiles.png"), ("gradcam", "gradcam/*.png")):
            files = sorted(out.glob(pattern))[:n]
            if files:
                logs[f"{split}/{key}"] = [wandb.Image(str(f), caption=f.stem) for f in files]
        if loc is not None:
            logs[f"{split}/localisation"] = wandb.Table(dataframe=loc)
        run.log(logs)
    finally:
        run.finish()
    log.info("W&B run %s (group %s) in %s", run.name, run.group, out / "wandb")


def finish_loggers(loggers: list) -> None:
    """Close the W&B run of any W&B logger (the others need nothing)."""
    if any(lg.__class__.__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
