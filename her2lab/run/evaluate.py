"""Evaluation task: a trained run's checkpoint on one split of its cohort, with uncertainty.

Rebuilds the run's data from its own ``config.yaml`` (the same cohort, folds and features — the
splits are checked against the run's ``splits.csv``), loads the checkpoint (the best one unless
``ckpt_path`` says otherwise), tests it, and writes next to each other: ``predictions.csv``,
``metrics.json`` (torchmetrics, as in training, plus the expected calibration error),
``metrics_ci.csv`` (95 % bootstrap intervals resampled by patient), ``curves.png`` (ROC and
precision-recall) and ``calibration.png``; for MIL runs, attention maps (``heatmaps/``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
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
    from her2lab.checkpoint import check_fits, load_checkpoint
    from her2lab.eval.bootstrap import patient_bootstrap
    from her2lab.plots import confusion_png, curves_png, reliability_png
    from her2lab.run.cohort import resolve_cohort
    from her2lab.run.entry import explanations_guard
    from her2lab.run.train import build, build_datamodule, write_predictions

    run_dir = find_run_dir(cfg.get("run_dir"), cfg.get("ckpt_path"))
    if run_dir is None:
        raise Her2labError(f"ckpt_path={cfg.ckpt_path}: not inside a training run folder (no config.yaml above it); give run_dir=…"
                           if cfg.get("ckpt_path") else "give run_dir=<a training run folder> or ckpt_path=<one of its checkpoints>")
    if not (run_dir / "config.yaml").is_file():
        raise Her2labError(f"run_dir={run_dir}: not a training run folder (no config.yaml)")
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        metrics_file = run_dir / "metrics.json"
        ckpt = json.loads(metrics_file.read_text()).get("best_checkpoint") if metrics_file.exists() else None
        if not ckpt:
            raise Her2labError(f"{run_dir}: no best checkpoint recorded (unfinished run?); give ckpt_path=…")
    state = load_checkpoint(ckpt)["state_dict"]  # as data only, before any work: a file that would run code is refused
    rcfg = OmegaConf.load(run_dir / "config.yaml")
    _check_targets(rcfg, run_dir / "config.yaml", cfg.get("allow_targets") or ())
    split = eval_split(cfg)
    external = split == "external"
    ran_cohort = _use_new_cohort(cfg, rcfg) if external else None
    out = ensure_writable_dir(_output_dir(cfg), "evaluation folder")
    with open_dict(rcfg):
        rcfg.paths.output_dir = str(out)
        rcfg.auto_pretrain = False
    if external:  # before any slide work: the new cohort must be new to the model
        _not_seen_in_training(run_dir, ran_cohort, rcfg.cohort, resolve_cohort(rcfg.cohort, int(rcfg.get("num_workers", 1))))
    pl.seed_everything(int(rcfg.seed), workers=True)
    dm = build_datamodule(rcfg, out)
    net = rcfg.model.get("net") or {}
    if "in_dim" in net and net.in_dim is None:  # runs whose config was saved before the features were read
        net.in_dim = rcfg.backbone.embed_dim
    if not external:
        _same_splits(run_dir / "splits.csv", out / "splits.csv")
    _same_features(run_dir / "features.json", out / "features.json")
    dm.setup("test")
    from her2lab.data.bags import write_excluded_tiles

    write_excluded_tiles(dm, out / "excluded_tiles.csv")  # tiles left out for non-finite features (data.nonfinite)
    ds = "test" if external else split
    if ds not in dm.datasets:
        raise Her2labError(f"split={split}: no slides in it (the run's cohort has {sorted(dm.datasets)})")
    module = build(rcfg.model)
    check_fits(module, state, ckpt)
    module.load_state_dict(state)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.test(module, dataloaders=dm._eval(ds))
    metrics = {k.replace("test/", f"{split}/", 1): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics[f"{split}/confusion_matrix"] = module.confusion.compute().tolist()
    metrics.update({"checkpoint": str(ckpt), "run_dir": str(run_dir), "split": split, "cohort": str(rcfg.cohort.name),
                    f"{split}/slides": len(dm.datasets[ds])})
    write_predictions(module, dm, rcfg, out / "predictions.csv", ds)
    preds = pd.read_csv(out / "predictions.csv").merge(
        pd.read_csv(out / "splits.csv", dtype={"slide_id": str, "patient_id": str})[["slide_id", "patient_id"]], on="slide_id")
    classes = [str(c) for c in rcfg.labels.classes]
    y = preds.label_index.to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    title = f"{split}: {run_dir.name}" + (f" on {rcfg.cohort.name}" if external else "")
    metrics[f"{split}/ece"] = reliability_png(y, probs, out / "calibration.png", title=title)
    curves_png(y, probs, classes, out / "curves.png", title=title)
    confusion_png(metrics[f"{split}/confusion_matrix"], classes, out / "confusion_matrix.png", title=title)
    ci = patient_bootstrap(preds, n=int(cfg.n_boot), seed=int(cfg.seed))
    with atomic_path(out / "metrics_ci.csv") as tmp:
        ci.to_csv(tmp, index=False)
    _write_metrics(out, metrics)  # before the explanations: their failure loses nothing
    hm = cfg.get("heatmaps") or {}
    loc = None
    if rcfg.data.kind == "bags" and hm.get("enabled", True):
        from her2lab.explain.mil_maps import attention_maps

        with explanations_guard("attention maps", out / "metrics.json"):
            loc = attention_maps(module, dm.datasets[ds], rcfg, out / "heatmaps", limit=hm.get("limit"),
                                 top_k=int(hm.get("top_k", 8)), chunk=int(hm.get("chunk", 8192)))
        if loc is not None:
            for k in ("attention", "tile_score"):
                if loc[f"{k}_auroc"].notna().any():
                    metrics[f"{split}/{k}_localisation_auroc"] = float(loc[f"{k}_auroc"].mean())
            _write_metrics(out, metrics)
    elif rcfg.data.kind == "thumbnail" and hm.get("enabled", True):
        from her2lab.explain.gradcam import save_gradcam

        with explanations_guard("Grad-CAM overlays", out / "metrics.json"):
            save_gradcam(module, dm.datasets[ds], module.test_outputs, classes, out / "gradcam",
                         layer=(rcfg.get("gradcam") or {}).get("layer"), limit=hm.get("limit"))
    if (cfg.get("wandb") or {}).get("enabled", False):
        log_wandb_eval(cfg.wandb, rcfg, run_dir, out, metrics, preds, classes, ci, loc)
    for r in ci.itertuples():
        log.info("%s %s = %.3f [%.3f, %.3f]", split, r.metric, r.value, r.lo, r.hi)
    log.info("evaluation folder: %s", out)
    return metrics.get(f"{split}/auroc")


def _write_metrics(out: Path, metrics: dict) -> None:
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))


#: Where the ``_target_``s of the parts evaluation builds from a run folder's config.yaml (``model``,
#: ``data``) may point: a config from elsewhere names that code, and beyond her2lab's own classes
#: and torch's optimisers (kept as partials, never called here) it could run anything.
SAFE_TARGETS = ("her2lab.", "torch.optim.")


def _check_targets(rcfg: DictConfig, where: Path, extra: tuple[str, ...] | list[str] = ()) -> None:
    """A one-line error when the run's ``model`` or ``data`` names a ``_target_`` outside
    :data:`SAFE_TARGETS` (and ``allow_targets``), before anything is built from it."""
    allowed = (*SAFE_TARGETS, *(str(p) for p in extra))

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            t = node.get("_target_")
            if t is not None and not str(t).startswith(allowed):
                raise Her2labError(f"{where}: {key}._target_={t!r} is not a class of her2lab or torch.optim, and "
                                   "building it could run any code; if you trust this run, allow it with "
                                   "allow_targets=[<its module prefix>]")
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")

    for part in ("model", "data"):
        walk(OmegaConf.to_container(rcfg, resolve=False).get(part), part)


def eval_split(cfg: DictConfig) -> str:
    """``val`` or ``test`` of the run's own cohort, or ``external``: every slide of a new cohort."""
    split = cfg.get("split")
    if cfg.get("cohort"):
        if split not in (None, "external"):
            raise Her2labError(f"split={split}: a new cohort is evaluated whole (split=external); "
                               "to test a subset, give a manifest of just those slides")
        return "external"
    if split == "external":
        raise Her2labError("split=external evaluates a new cohort: give cohort=<name> (e.g. cohort=custom cohort.manifest=…)")
    split = split or "test"
    if split not in ("val", "test"):
        raise Her2labError(f"split={split}: evaluate on val or test (training items are sub-sampled), or a new cohort")
    return str(split)


def find_run_dir(run_dir: str | None, ckpt_path: str | None) -> Path | None:
    """``run_dir``, or the run folder a checkpoint lies in (the nearest folder above it with a
    ``config.yaml``)."""
    if run_dir:
        return Path(run_dir)
    if ckpt_path:
        return next((d for d in Path(ckpt_path).absolute().parents if (d / "config.yaml").is_file()), None)
    return None


def eval_dir(run_dir: str | None, ckpt_path: str | None, split: str | None, cohort: str | None) -> str:
    """Where an evaluation goes: ``<run>/eval/<split>`` or ``<run>/eval/external-<cohort>`` (the
    timestamp is added after it). Without a run folder the evaluation stops with a message; its
    Hydra folder then goes to the temporary directory rather than litter the working folder."""
    import tempfile

    found = find_run_dir(run_dir, ckpt_path)
    name = f"external-{cohort}" if cohort else str(split or "test")
    return str((found if found is not None else Path(tempfile.gettempdir()) / "her2lab-no-run") / "eval" / name)


def _use_new_cohort(cfg: DictConfig, rcfg: DictConfig) -> dict:
    """Point the run's config at the new cohort (its paths resolve against the run's ``paths``);
    returns the run's own cohort config."""
    if rcfg.data.kind == "patch_folder":
        raise Her2labError("the run trained on a patch folder (data=patch_folder), not on slides: it has no cohort to "
                           "replace; evaluate it with split=val|test")
    new = OmegaConf.to_container(cfg.cohort, resolve=False)
    ran = OmegaConf.to_container(rcfg.cohort, resolve=True)
    with open_dict(rcfg):
        rcfg.cohort = new
        rcfg.external_cohort = True
        if cfg.get("features_dir"):
            rcfg.data.features_dir = str(cfg.features_dir)
        elif rcfg.data.get("features_dir"):
            raise Her2labError(f"the run read features from data.features_dir={rcfg.data.features_dir}; "
                               f"give features_dir=<the {rcfg.cohort.name} cohort's features, same encoder>")
    if Path(str(rcfg.cohort.manifest)).resolve() == Path(str(ran["manifest"])).resolve():
        raise Her2labError(f"cohort={rcfg.cohort.name} is the run's own cohort; use split=val or split=test")
    have, want = str(rcfg.cohort.get("stain") or ""), str(ran.get("stain") or "")
    if have and want and have != want and not cfg.get("allow_other_stain", False):
        raise Her2labError(f"the run was trained on {want} slides but cohort {rcfg.cohort.name} is {have}; "
                           "set allow_other_stain=true to evaluate across stains anyway")
    return ran


def _not_seen_in_training(run_dir: Path, ran_cohort: dict, cohort: DictConfig, new: pd.DataFrame) -> None:
    """An external cohort holding slides the run trained or validated on would report optimistic
    numbers: an error. Shared patient ids (may be a coincidence of numbering) are a warning."""
    from her2lab.data.cohort import load_manifest

    ran = run_dir / "splits.csv"
    if not ran.exists() or not Path(str(ran_cohort["manifest"])).is_file():
        log.warning("%s: no splits.csv or manifest; cannot check that cohort %s is new to the run", run_dir, cohort.name)
        return
    a = pd.read_csv(ran, dtype=str)
    seen = a[a.split.isin(["train", "val"])]
    old = load_manifest(ran_cohort["manifest"])
    seen_paths = {str(Path(p).resolve()) for p in old.path[old.slide_id.isin(seen.slide_id)]}
    both = sorted(new.slide_id[[str(Path(p).resolve()) in seen_paths for p in new.path]])
    if both:
        raise Her2labError(f"cohort {cohort.name} holds {len(both)} slide(s) the run trained or validated on "
                           f"({', '.join(both[:5])}); an external cohort must be new to the model")
    shared = sorted(set(seen.patient_id) & set(new.patient_id.astype(str)))
    if shared:
        log.warning("cohort %s shares %d patient id(s) with the run's training/validation slides (%s): "
                    "if they are the same patients, the external metrics are optimistic",
                    cohort.name, len(shared), ", ".join(shared[:5]))


def _same_features(ran: Path, now: Path) -> None:
    """Features of the evaluated slides must come from the encoder (and weights, tile size and
    resolution) the model was trained on."""
    if not ran.exists() or not now.exists():
        return
    a, b = json.loads(ran.read_text()), json.loads(now.read_text())
    diff = [f"{k}={b[k]!r} (trained on {a[k]!r})" for k in a if k != "folder" and k in b and a[k] != b[k]]
    if diff:
        raise Her2labError(f"features in {b.get('folder')} were made differently from the run's: {', '.join(diff)}; "
                           "extract them with the run's backbone")


def _same_splits(ran: Path, now: Path) -> None:
    if not ran.exists():
        return
    a = pd.read_csv(ran, dtype=str).sort_values("slide_id").reset_index(drop=True)
    b = pd.read_csv(now, dtype=str).sort_values("slide_id").reset_index(drop=True)
    if not a[["slide_id", "split"]].equals(b[["slide_id", "split"]]):
        raise Her2labError(f"the cohort's splits differ from the run's ({ran}): has the manifest changed since training?")


def run_group(rcfg: DictConfig, run_dir: Path) -> str:
    """The W&B group the training run logged to: its configured group, else its task (plus its
    sweep folder when it was a multirun job, as training names it)."""
    from her2lab.run.train import wandb_group

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
