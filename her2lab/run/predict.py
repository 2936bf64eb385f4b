"""Scoring slides: a trained run, or the finished fold models of a sweep as one ensemble, on a
folder of slides (``slides=``), a new cohort (``cohort=``, labels optional) or its own test split;
with split-conformal prediction sets, referral, and one report page per slide.

``eval.py`` comes here. For each model the evaluation task (:mod:`her2lab.run.evaluate`) runs the
run's own pipeline on the slides (its tissue and tiling settings, its encoder or thumbnails, the
same checks); an ensemble averages the models' class probabilities per slide and reports their
spread. Each model's validation predictions (``<run>/eval/calibration/``, made once per
checkpoint and kept) calibrate the conformal sets (:mod:`her2lab.eval.conformal`); with several
models their validation predictions are pooled. Then ``predictions.csv`` gains ``set``,
``refer``, ``refer_reason`` (and ``n_models``, ``spread``, ``agreement`` for an ensemble),
``metrics.json`` the sets' empirical coverage on the labelled slides, and ``reports/`` one
self-contained HTML page per slide with an index.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.data.cohort import SLIDE_ID_PUNCTUATION, check_slide_id
from her2lab.errors import Her2labError
from her2lab.eval.conformal import (
    conformal_threshold,
    empirical_coverage,
    min_calibration_slides,
    prediction_sets,
    referral,
    set_names,
)
from her2lab.eval.jobs import summarize_sweep
from her2lab.eval.run_folder import best_checkpoint, find_run_dir, require_run_dir, write_json
from her2lab.io import atomic_path, ensure_writable_dir
from her2lab.metrics import score_all
from her2lab.run.evaluate import Evaluation, figures_and_intervals, run_evaluation

log = logging.getLogger(__name__)

#: File name endings of the slide formats OpenSlide reads (a folder of slides is searched for these).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi",
                  ".dcm")


def score(cfg: DictConfig) -> float | None:
    """``eval.py``: evaluate, predict, ensemble and report as the config asks; returns the macro
    AUROC over the labelled slides (None without any)."""
    runs, left_out = model_runs(cfg.get("run_dir"), cfg.get("ckpt_path"))
    sweep = bool(cfg.get("run_dir")) and not (Path(str(cfg.run_dir)) / "config.yaml").is_file()
    if cfg.get("slides") and cfg.get("cohort"):
        raise Her2labError("give slides=<folder or glob> or cohort=<name>, not both")
    if sweep and not (cfg.get("slides") or cfg.get("cohort")):
        raise Her2labError(f"run_dir={cfg.run_dir} is a sweep of {len(runs)} models, each tested on its own fold: "
                           "score new slides with slides=<folder> or cohort=<name>, evaluate one job folder, or "
                           f"summarise the folds with python -m her2lab.cv {cfg.run_dir}")
    out = ensure_writable_dir(Path(cfg.output_dir) if cfg.get("output_dir") else Path(HydraConfig.get().runtime.output_dir),
                              "evaluation folder")
    cfg = _with_slides(cfg, out)
    if (cfg.get("split") or "test") == "val" and not cfg.get("cohort"):
        metrics = run_evaluation(_inner(cfg, runs[0], out)).metrics  # the calibration split itself
        log_final_metrics(metrics, "val")
        return metrics.get("val/auroc")
    conformal = cfg.get("conformal") or {}
    if not sweep:
        ev = run_evaluation(_inner(cfg, runs[0], out, ckpt_path=cfg.get("ckpt_path")))
        preds = _read_predictions(out / "predictions.csv")
        evals = [ev]
    else:
        evals = []
        for i, run in enumerate(runs):
            log.info("model %d of %d: %s", i + 1, len(runs), run)
            evals.append(run_evaluation(_inner(cfg, run, out / "models" / run.name, explain=i == 0, wandb=False)))
        preds = ensemble([_read_predictions(e.out / "predictions.csv") for e in evals], _classes(evals[0]))
        _gather_excluded(evals, out)
    ev, split, classes = evals[0], evals[0].split, _classes(evals[0])
    metrics = _ensemble_metrics(cfg, preds, evals, left_out, out) if sweep else dict(ev.metrics)
    if conformal.get("enabled", True):
        cal = pd.concat([calibration_predictions(cfg, run, None if sweep else cfg.get("ckpt_path"))
                         for run in runs], ignore_index=True)
        preds, extra = add_sets(preds, cal, classes, ev.run_cfg.labels, float(conformal.get("coverage", 0.9)))
        metrics.update({f"{split}/{k}": v for k, v in extra.items()})
    with atomic_path(out / "predictions.csv") as tmp:
        preds.to_csv(tmp, index=False)
    write_json(out / "metrics.json", metrics)
    log_final_metrics(metrics, split)
    if (cfg.get("report") or {}).get("enabled", True):
        _reports(out, preds, classes, evals, runs, left_out)
    log.info("scored %d slide(s) with %d model(s)%s → %s", len(preds), len(runs),
             f"; {int(preds.refer.sum())} referred" if "refer" in preds else "", out)
    return metrics.get(f"{split}/auroc")


def log_final_metrics(metrics: dict, split: str) -> None:
    """The scalar metrics of ``split`` as one log line (into ``eval.log`` with the rest)."""
    shown = []
    for k, v in metrics.items():
        if k.startswith(f"{split}/") and isinstance(v, int | float) and not isinstance(v, bool):
            name = k.split("/", 1)[1]
            shown.append(f"{name}={v:.4f}" if isinstance(v, float) else f"{name}={v}")
    if shown:
        log.info("%s metrics: %s", split, " ".join(shown))


# -- which models ------------------------------------------------------------------------------


def model_runs(run_dir: str | None, ckpt_path: str | None) -> tuple[list[Path], dict[str, str]]:
    """The training runs to score with: ``run_dir`` itself (or the run ``ckpt_path`` lies in), or
    every finished job of a sweep folder; returns them and the jobs left out with the reason.

    Raises:
        Her2labError: no run folder given; a sweep without a finished job, or whose jobs differ
            in what they predict (labels, kind of data, encoder).
    """
    found = find_run_dir(run_dir, ckpt_path)
    if found is not None and (found / "config.yaml").is_file():
        return [found], {}
    if found is None or not found.is_dir():
        return [require_run_dir(run_dir, ckpt_path)], {}
    table = summarize_sweep(found)
    if table.empty:
        require_run_dir(run_dir, ckpt_path)  # its one-line error: not a run folder
    runs, left = [], {}
    for r in table.itertuples():
        if r.status != "done":
            left[str(r.job)] = r.error or r.status
            continue
        try:
            best_checkpoint(Path(r.run_dir))
        except Her2labError:
            left[str(r.job)] = "no best checkpoint recorded"
            continue
        runs.append(Path(r.run_dir))
    if not runs:
        detail = "; ".join(f"job {k}: {v}" for k, v in list(left.items())[:5])
        raise Her2labError(f"run_dir={found}: no finished model in this sweep ({detail}); nothing to score with")
    for job, why in left.items():
        log.warning("sweep job %s left out of the ensemble: %s", job, why)
    _same_task(runs)
    return runs, left


def _same_task(runs: list[Path]) -> None:
    """An ensemble averages like with like: same classes, kind of data and encoder."""
    def key(run: Path) -> tuple:
        c = OmegaConf.load(run / "config.yaml")
        data = c.data.get("_target_") or c.data.get("kind")
        return (tuple(str(x) for x in c.labels.classes), str(data), str(c.backbone.get("name")))

    keys = {run.name: key(run) for run in runs}
    if len(set(keys.values())) > 1:
        first = next(iter(keys))
        other = next(k for k, v in keys.items() if v != keys[first])
        raise Her2labError(f"the sweep's models differ (job {first}: {keys[first]}, job {other}: {keys[other]}); "
                           "an ensemble needs one setting: give run_dir=<one job folder>")


# -- a folder of slides --------------------------------------------------------------------------


def slides_manifest(spec: str, out: Path) -> Path:
    """A manifest (``slides.csv`` in ``out``) of the slides a folder, glob or file names: ids from
    the file names (made safe as file names), each slide its own patient, no labels.

    Raises:
        Her2labError: nothing found, or two files giving one id.
    """
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
        skipped = sum(1 for f in path.iterdir() if f.is_file() and f.suffix.lower() not in SLIDE_SUFFIXES)
        if skipped:
            log.info("slides=%s: %d file(s) not named like a slide left aside (%s)", spec, skipped, " ".join(SLIDE_SUFFIXES))
    elif any(c in str(spec) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path)) if Path(f).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise Her2labError(f"slides={spec}: no such folder or file, and no file matches it")
    if not files:
        raise Her2labError(f"slides={spec}: no slide file in it (looked for {' '.join(SLIDE_SUFFIXES)})")
    ids = [safe_slide_id(f.name[: -len(f.suffix)] if f.suffix else f.name) for f in files]
    seen: dict[str, Path] = {}
    for i, f in zip(ids, files, strict=True):
        if i.casefold() in seen:
            raise Her2labError(f"slides={spec}: {seen[i.casefold()].name} and {f.name} would both be slide {i!r}; "
                               "rename one, or give a manifest (cohort=custom cohort.manifest=…)")
        seen[i.casefold()] = f
    table = pd.DataFrame({"slide_id": ids, "patient_id": ids, "path": [str(f.resolve()) for f in files],
                          "her2_score": ""})
    with atomic_path(out / "slides.csv") as tmp:
        table.to_csv(tmp, index=False)
    log.info("slides=%s: %d slide(s) to score", spec, len(table))
    return out / "slides.csv"


def safe_slide_id(name: str) -> str:
    """A file's name as a slide id: characters a slide id may not hold become ``_``."""
    s = "".join(c if (c.isalnum() or c in SLIDE_ID_PUNCTUATION) else "_" for c in name).strip()
    s = "_" + s[1:] if s.startswith(".") else s
    return check_slide_id(s.encode("utf-8")[:200].decode("utf-8", "ignore") or "_")


def slides_cohort_name(spec: str) -> str:
    """``slides-<folder name>-<hash of its absolute path>``: its caches never mix with another folder's."""
    path = Path(str(spec)).expanduser().absolute()
    base = path if path.is_dir() else path.parent
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"slides-{safe_slide_id(base.name or 'slides')[:60]}-{digest}"


def _with_slides(cfg: DictConfig, out: Path) -> DictConfig:
    """``slides=`` as a cohort node (its caches under the run's ``paths.data_dir``)."""
    if not cfg.get("slides"):
        return cfg
    name = slides_cohort_name(str(cfg.slides))
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.cohort = {"name": name, "manifest": str(slides_manifest(str(cfg.slides), out)),
                      "cache_dir": "${paths.data_dir}/" + name, "mpp_override": cfg.get("mpp_override"),
                      "stain": cfg.get("stain"), "allow_mixed_stains": False, "synthetic": None,
                      "roi_dir": cfg.get("roi_dir")}
    if not cfg.get("stain"):
        log.info("slides=%s: taken to be of the stain the model was trained on (set stain=hne|ihc to check)", cfg.slides)
    return cfg


# -- the evaluations ----------------------------------------------------------------------------


def _inner(cfg: DictConfig, run: Path, out: Path, ckpt_path: str | None = None, explain: bool = True,
           wandb: bool = True, split: str | None = None, cohort: bool = True) -> DictConfig:
    """The evaluation config of one model."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(c):
        c.run_dir, c.ckpt_path, c.output_dir, c.slides = str(run), ckpt_path, str(out), None
        if split is not None:
            c.split = split
        if not cohort:
            c.cohort = None
        if not explain:
            c.heatmaps = {**(c.get("heatmaps") or {}), "enabled": False}
        if not wandb:
            c.wandb = {**(c.get("wandb") or {}), "enabled": False}
    return c


def calibration_predictions(cfg: DictConfig, run: Path, ckpt_path: str | None = None) -> pd.DataFrame:
    """The run's validation predictions from its checkpoint (``<run>/eval/calibration/``, made
    once per checkpoint and kept)."""
    ckpt = str(ckpt_path or best_checkpoint(run))
    folder = run / "eval" / "calibration"
    meta = folder / "metrics.json"
    if (folder / "predictions.csv").exists() and meta.exists() and json.loads(meta.read_text()).get("checkpoint") == ckpt:
        return _read_predictions(folder / "predictions.csv")
    log.info("calibration: validation predictions of %s", run.name)
    inner = _inner(cfg, run, folder, ckpt_path=ckpt, explain=False, wandb=False, split="val", cohort=False)
    with open_dict(inner):
        inner.n_boot = min(int(inner.get("n_boot", 1000)), 200)
    run_evaluation(inner)
    return _read_predictions(folder / "predictions.csv")


def _read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "label": str}, keep_default_na=False)


def _classes(ev: Evaluation) -> list[str]:
    return [str(c) for c in ev.run_cfg.labels.classes]


# -- ensemble, sets, metrics ----------------------------------------------------------------------


def ensemble(tables: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    """Per slide, the mean of the models' class probabilities; ``n_models`` that scored it,
    ``spread`` (the largest standard deviation of a class probability across them) and
    ``agreement`` (the share of models whose top class is the ensemble's)."""
    cols = [f"p_{c}" for c in classes]
    both = pd.concat(tables, ignore_index=True)
    rows = []
    for sid, g in both.groupby("slide_id", sort=False):
        p = g[cols].to_numpy(dtype=float)
        mean = p.mean(0)
        k = int(mean.argmax())
        rows.append({"slide_id": sid, "label": g.label.iloc[0], "label_index": int(g.label_index.iloc[0]),
                     **dict(zip(cols, mean, strict=True)), "pred": classes[k], "n_models": len(g),
                     "spread": float(p.std(0).max()) if len(g) > 1 else float("nan"),
                     "agreement": float((p.argmax(1) == k).mean())})
    return pd.DataFrame(rows)


def add_sets(preds: pd.DataFrame, cal: pd.DataFrame, classes: list[str], labels: DictConfig,
             coverage: float) -> tuple[pd.DataFrame, dict]:
    """``set``, ``refer``, ``refer_reason``, ``coverage`` columns from the calibration predictions
    ``cal`` (labelled validation slides); returns them and the sets' metrics."""
    cols = [f"p_{c}" for c in classes]
    cal = cal[cal.label_index >= 0]
    try:
        q = conformal_threshold(cal[cols].to_numpy(dtype=float), cal.label_index.to_numpy(dtype=int), coverage)
    except ValueError as exc:
        raise Her2labError(f"conformal.coverage: {exc}") from None
    if math.isinf(q):
        log.warning("conformal: %d calibration slide(s) are too few for %.0f %% coverage (needs ≥ %d): every set is "
                    "every class and every slide is referred", len(cal), 100 * coverage, min_calibration_slides(coverage))
    sets = prediction_sets(preds[cols].to_numpy(dtype=float), q)
    names = set_names(sets, classes)
    clinical = {str(k): str(v) for k, v in (labels.get("clinical") or {}).items()}
    always = [str(c) for c in (labels.get("refer_always") or [])]
    refer = [referral([c for c, m in zip(classes, row, strict=True) if m], clinical, always) for row in sets]
    preds = preds.assign(set=names, refer=[r for r, _ in refer], refer_reason=[w for _, w in refer], coverage=coverage)
    labelled = preds.label_index.to_numpy(dtype=int)
    covered = empirical_coverage(sets, labelled)
    extra = {"conformal_coverage": covered if math.isfinite(covered) else None, "conformal_target": coverage,
             "conformal_threshold": q if math.isfinite(q) else None, "conformal_calibration_slides": len(cal),
             "set_size_mean": float(sets.sum(1).mean()), "refer_rate": float(np.mean([r for r, _ in refer]))}
    if (labelled >= 0).any():
        log.info("conformal sets at %.0f %%: covered %.3f of %d labelled slide(s), mean size %.2f, %d referred",
                 100 * coverage, extra["conformal_coverage"], int((labelled >= 0).sum()), extra["set_size_mean"],
                 int(preds.refer.sum()))
    return preds, extra


def _ensemble_metrics(cfg: DictConfig, preds: pd.DataFrame, evals: list[Evaluation], left_out: dict[str, str],
                      out: Path) -> dict:
    """The ensemble's metrics over its labelled slides, their patient-bootstrap intervals and figures."""
    split, classes = evals[0].split, _classes(evals[0])
    metrics: dict = {"split": split, "cohort": str(evals[0].run_cfg.cohort.name), "run_dir": str(cfg.run_dir),
                     "models": [str(e.metrics.get("run_dir")) for e in evals],
                     "checkpoints": [str(e.metrics.get("checkpoint")) for e in evals],
                     "left_out": left_out, f"{split}/slides": len(preds)}
    labelled = preds[preds.label_index >= 0]
    if len(labelled) < len(preds):
        metrics[f"{split}/slides_unlabelled"] = len(preds) - len(labelled)
    if len(labelled):
        y, p = labelled.label_index.to_numpy(dtype=int), labelled[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
        metrics.update({f"{split}/{k}": v for k, v in score_all(y, p).items()})
        cm = np.zeros((len(classes), len(classes)), dtype=int)
        np.add.at(cm, (y, p.argmax(1)), 1)
        metrics[f"{split}/confusion_matrix"] = cm.tolist()
        splits = pd.read_csv(evals[0].out / "splits.csv", dtype={"slide_id": str, "patient_id": str})
        figures_and_intervals(cfg, labelled.merge(splits[["slide_id", "patient_id"]], on="slide_id"), classes, metrics,
                              out, title=f"{split}: ensemble of {len(evals)} on {metrics['cohort']}")
    return metrics


def _gather_excluded(evals: list[Evaluation], out: Path) -> None:
    """The slides any model could not score (``excluded_slides.csv``), in one table at the top."""
    parts = [pd.read_csv(e.out / "excluded_slides.csv", dtype=str) for e in evals if (e.out / "excluded_slides.csv").exists()]
    if parts:
        table = pd.concat(parts).drop_duplicates("slide_id")
        with atomic_path(out / "excluded_slides.csv") as tmp:
            table.to_csv(tmp, index=False)


def _reports(out: Path, preds: pd.DataFrame, classes: list[str], evals: list[Evaluation], runs: list[Path],
             metrics_left: dict[str, str] | None = None) -> None:
    """One HTML page per slide and an index (``reports/``)."""
    from her2lab.explain.report import collect_pictures, write_reports
    from her2lab.slides.prepare import PrepareSettings

    rcfg = evals[0].run_cfg
    try:
        prep = PrepareSettings.from_config(rcfg)
    except Exception:  # a run on features made elsewhere has no tiling of its own to show
        prep = None
    bb = rcfg.backbone
    meta = {"model": f"{rcfg.model.get('name') or rcfg.model.get('_target_')} ({rcfg.labels.name}: {', '.join(classes)})",
            "encoder": f"{bb.get('preset') or bb.get('name')} ({bb.get('weights') or 'default weights'})",
            "runs": ", ".join(str(r) for r in runs),
            "checkpoints": ", ".join(Path(str(e.metrics.get("checkpoint"))).name for e in evals),
            "cohort": str(rcfg.cohort.name),
            "pictures from": str(runs[0]) if len(runs) > 1 else "the model",
            "left out": ", ".join(f"job {k} ({v})" for k, v in (metrics_left or {}).items()) or "—",
            "made": datetime.now().isoformat(timespec="seconds")}
    pictures = collect_pictures(evals[0].out, list(preds.slide_id), prep, classes)
    index = write_reports(out, preds, classes, pictures, meta)
    log.info("reports: %s", index)
