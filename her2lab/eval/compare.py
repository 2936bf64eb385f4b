"""Compare experiments on the same slides: ``compare.md`` / ``compare.csv``.

Each experiment is a run folder or a sweep folder (its finished fold runs pooled: every test
slide once). The table gives each one's pooled macro AUROC, F1 and accuracy with 95 % patient
bootstrap intervals; each experiment after the first is compared with the first on the slides
both predicted: the AUROC difference with its paired bootstrap interval (the same patients
drawn for both) and a two-sided bootstrap p-value. Experiments trained on different cohorts whose
slide ids coincide are refused (the ids would pair different slides).

    python -m her2lab.compare <reference dir> <other dir> [...] [--out DIR] [--n-boot 2000]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from her2lab.errors import Her2labError, ManifestError
from her2lab.eval.bootstrap import macro_auroc, patient_bootstrap, patient_resamples
from her2lab.eval.cv import out_of_fold
from her2lab.metrics import summary_metrics


def predictions_of(folder: Path) -> pd.DataFrame:
    """Test predictions of a run folder, or of a sweep folder's finished runs (with patient ids)."""
    folder = Path(folder)
    if (folder / "predictions.csv").exists():
        return out_of_fold([folder])
    runs = sorted(p.parent for p in folder.glob("*/predictions.csv"))
    if not runs:
        raise Her2labError(f"{folder}: no predictions.csv in it or in its job folders")
    return out_of_fold(runs)


def cohorts_of(folder: Path) -> dict[str, str]:
    """The cohort(s) a run or sweep folder's runs were trained on: ``{identity: name}``, from each
    run's ``config.yaml`` (a synthetic cohort is its name and generator settings; any other its
    name and manifest). Empty when no run has its config."""
    from omegaconf import OmegaConf

    folder = Path(folder)
    one = folder / "config.yaml"
    configs = [one] if one.exists() else sorted(folder.glob("*/config.yaml"))
    out = {}
    for cfg in configs:
        cohort = OmegaConf.load(cfg).get("cohort") or {}
        name = str(cohort.get("name", "?"))
        syn = cohort.get("synthetic")
        if syn:
            what = json.dumps(OmegaConf.to_container(syn), sort_keys=True)
        else:
            what = str(cohort.get("manifest", ""))
        out[f"{name} {what}"] = name
    return out


def check_same_cohort(folders: list[Path], preds: list[pd.DataFrame]) -> None:
    """Experiments of different cohorts whose slide ids coincide would be paired slide by slide as
    if they were the same slides: a one-line error naming the ids."""
    ref = cohorts_of(folders[0])
    for folder, p in zip(folders[1:], preds[1:], strict=True):
        other = cohorts_of(folder)
        if not ref or not other or set(ref) == set(other):
            continue
        both = sorted(set(preds[0].slide_id) & set(p.slide_id))
        if both:
            names = [", ".join(sorted(set(c.values()))) for c in (ref, other)]
            shown = ", ".join(both[:5]) + (", …" if len(both) > 5 else "")
            raise ManifestError(
                f"{folders[0]} (cohort {names[0]}) and {folder} (cohort {names[1]}) are different "
                f"cohorts whose slide ids coincide ({len(both)}: {shown}); ids must name one "
                "slide: give one cohort other ids (a synthetic cohort: cohort.synthetic.id_prefix)")


def paired_auroc(a: pd.DataFrame, b: pd.DataFrame, n: int = 2000, seed: int = 0) -> dict:
    """AUROC(b) − AUROC(a) on their common slides, with a paired patient bootstrap."""
    common = a.merge(b, on=["slide_id", "patient_id", "label_index"], suffixes=("_a", "_b"))
    if common.empty:
        raise Her2labError("the two experiments share no test slide; compare runs on the same cohort and folds")
    y = common.label_index.to_numpy()
    pa = common[[c for c in common.columns if c.startswith("p_") and c.endswith("_a")]].to_numpy(float)
    pb = common[[c for c in common.columns if c.startswith("p_") and c.endswith("_b")]].to_numpy(float)
    if pa.shape != pb.shape:
        raise Her2labError("the two experiments predict different classes; compare runs with the same labels")
    diff = macro_auroc(y, pb) - macro_auroc(y, pa)
    draws = []
    for idx in patient_resamples(common.patient_id.to_numpy(), n, seed):
        d = macro_auroc(y[idx], pb[idx]) - macro_auroc(y[idx], pa[idx])
        if np.isfinite(d):
            draws.append(d)
    draws = np.asarray(draws)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    p = min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))  # two-sided, bootstrap
    return {"common_slides": len(common), "auroc_diff": diff, "diff_lo": float(lo), "diff_hi": float(hi), "p_value": float(p)}


def label_of(folder: Path) -> str:
    """``task_name (folder)`` from the run's or the sweep's config, else the folder."""
    for cfg in (folder / "config.yaml", folder / "multirun.yaml"):
        if cfg.exists():
            from omegaconf import OmegaConf

            task = OmegaConf.load(cfg).get("task_name")
            if task:
                return f"{task} ({folder.name})"
    return str(folder)


def compare(folders: list[Path], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    if len(folders) < 2:
        raise Her2labError("give at least two experiments to compare (the first is the reference)")
    preds = [predictions_of(f) for f in folders]
    check_same_cohort([Path(f) for f in folders], preds)
    rows = []
    for i, (folder, p) in enumerate(zip(folders, preds, strict=True)):
        ci = patient_bootstrap(p, n=n_boot, seed=seed).set_index("metric")
        row = {"experiment": label_of(Path(folder)), "slides": len(p)}
        for m, _ in summary_metrics():
            row.update({m: ci.loc[m, "value"], f"{m} lo": ci.loc[m, "lo"], f"{m} hi": ci.loc[m, "hi"]})
        if i > 0:
            row.update(paired_auroc(preds[0], p, n=n_boot, seed=seed))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """One row per experiment: each summary metric (the registry's) with its patient-bootstrap
    interval, and the paired ΔAUROC against the first."""
    shown = summary_metrics()
    head = ["experiment", "slides", *(f"{t} [95% CI]" for _, t in shown), "ΔAUROC vs first [95% CI]", "p"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for i, r in table.iterrows():
        cells = [f"{r[m]:.3f} [{r[f'{m} lo']:.3f}, {r[f'{m} hi']:.3f}]" for m, _ in shown]
        if i == 0:
            delta, p = "(reference)", ""
        else:
            delta = f"{r.auroc_diff:+.3f} [{r.diff_lo:+.3f}, {r.diff_hi:+.3f}] on {int(r.common_slides)} slides"
            p = f"{r.p_value:.3f}"
        lines.append(f"| `{r.experiment}` | {int(r.slides)} | {' | '.join(cells)} | {delta} | {p} |")
    lines += ["", "Intervals: percentile bootstrap resampling patients; Δ: paired, the same patients drawn for both."]
    return "\n".join(lines) + "\n"
