"""Cross-validation summary of a sweep folder: ``cv_summary.csv`` and ``cv_summary.md``.

Jobs are grouped by their overrides without ``fold=…`` (one group per setting, e.g. per
backbone). Per group: the test metrics' mean ± sd over its folds, and the pooled out-of-fold
metrics — every test prediction of the group's folds together, each slide once — with 95 %
bootstrap intervals resampled by patient. Failed and unfinished jobs are left out and listed.
Folds that all tested the same held-out slides (``data.cv_protocol=study``) are not pooled.

    python -m her2lab.cv <sweep dir> [--n-boot 1000]
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from her2lab.errors import Her2labError
from her2lab.eval.bootstrap import patient_bootstrap
from her2lab.eval.jobs import fold_metric_columns, summarize_sweep
from her2lab.io import atomic_path
from her2lab.metrics import summary_metrics

log = logging.getLogger(__name__)

FOLD_RE = re.compile(r"(^|\s)fold=\S+(?=\s|$)")


def setting_of(overrides: str) -> str:
    """A job's overrides without ``fold=…``: the setting its folds share."""
    return FOLD_RE.sub("", str(overrides or "")).strip() or "(defaults)"


def out_of_fold(run_dirs: list[Path]) -> pd.DataFrame:
    """The test predictions of several fold runs, with patient ids; each slide at most once."""
    parts = []
    for run in run_dirs:
        preds = pd.read_csv(run / "predictions.csv")
        splits = pd.read_csv(run / "splits.csv", dtype={"slide_id": str, "patient_id": str})
        parts.append(preds.merge(splits[["slide_id", "patient_id"]], on="slide_id", how="left"))
    table = pd.concat(parts, ignore_index=True)
    lost = table.slide_id[table.patient_id.isna()]
    if len(lost):
        raise Her2labError(f"slide(s) {', '.join(lost[:5])} of predictions.csv are not in the run's splits.csv")
    dup = table.slide_id[table.slide_id.duplicated()]
    if len(dup):
        raise Her2labError(f"slide(s) {', '.join(dup[:5])} are test predictions of more than one run; pool runs of different folds only")
    return table


def shared_test_set(run_dirs: list[Path]) -> bool:
    """True when several runs all tested the same slides (``data.cv_protocol=study``)."""
    if len(run_dirs) < 2:
        return False
    sets = [frozenset(pd.read_csv(r / "predictions.csv", dtype={"slide_id": str}).slide_id) for r in run_dirs]
    return all(s == sets[0] for s in sets[1:])


def cv_summary(sweep_dir: Path, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per setting; writes ``cv_summary.csv`` and ``cv_summary.md`` in ``sweep_dir``."""
    jobs = summarize_sweep(sweep_dir)
    if jobs.empty:
        raise Her2labError(f"{sweep_dir}: no job folders (a Hydra multirun folder has 0/, 1/, …)")
    jobs["setting"] = jobs.overrides.map(setting_of)
    rows = []
    for setting, g in jobs.groupby("setting", sort=False):
        done = g[g.status == "done"]
        row: dict = {"setting": setting, "folds_done": len(done), "folds_left_out": len(g) - len(done),
                     "left_out_jobs": " ".join(g.job[g.status != "done"].astype(str))}
        for m in fold_metric_columns():
            v = done[m].astype(float)
            row[f"{m} mean"] = v.mean() if len(v) else np.nan
            row[f"{m} sd"] = v.std(ddof=1) if len(v) > 1 else np.nan
        if len(done) and shared_test_set([Path(r) for r in done.run_dir]):
            # data.cv_protocol=study: every fold's model tested the same held-out slides; nothing to
            # pool, the setting's result is the mean ± sd over its models (as the study reports it)
            row["shared test slides"] = len(pd.read_csv(Path(done.run_dir.iloc[0]) / "predictions.csv"))
        elif len(done):
            pooled = patient_bootstrap(out_of_fold([Path(r) for r in done.run_dir]), n=n_boot, seed=seed)
            for r in pooled.itertuples():
                row[f"pooled {r.metric}"] = r.value
                row[f"pooled {r.metric} lo"] = r.lo
                row[f"pooled {r.metric} hi"] = r.hi
            row["pooled slides"] = int(sum(len(pd.read_csv(Path(r) / "predictions.csv")) for r in done.run_dir))
        rows.append(row)
    table = pd.DataFrame(rows)
    with atomic_path(Path(sweep_dir) / "cv_summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(Path(sweep_dir) / "cv_summary.md") as tmp:
        tmp.write_text(markdown(table))
    return table


def _ci(row: pd.Series, m: str) -> str:
    v = row.get(f"pooled {m}", np.nan)
    if not np.isfinite(v):
        return "–"
    return f"{v:.3f} [{row[f'pooled {m} lo']:.3f}, {row[f'pooled {m} hi']:.3f}]"


def _mean_sd(row: pd.Series, m: str) -> str:
    mean, sd = row.get(f"{m} mean", np.nan), row.get(f"{m} sd", np.nan)
    if np.isfinite(sd):
        return f"{mean:.3f} ± {sd:.3f}"
    return f"{mean:.3f}" if np.isfinite(mean) else "–"


def markdown(table: pd.DataFrame) -> str:
    """The summary table: per setting, the folds, then for each summary metric (the registry's)
    its mean ± sd over folds and its pooled value with the patient-bootstrap interval."""
    shown = summary_metrics()
    head = ["setting", "folds", *(f"test {t} mean ± sd" for _, t in shown), *(f"pooled {t} [95% CI]" for _, t in shown)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, r in table.iterrows():
        ms = [_mean_sd(r, f"test/{m}") for m, _ in shown]
        folds = f"{int(r.folds_done)}" + (f" (+{int(r.folds_left_out)} failed/unfinished: jobs {r.left_out_jobs})" if r.folds_left_out else "")
        lines.append(f"| `{r.setting}` | {folds} | {' | '.join(ms)} | {' | '.join(_ci(r, m) for m, _ in shown)} |")
    lines.append("")
    lines.append("Pooled: all test predictions of a setting's folds together (each slide once); intervals: "
                 "percentile bootstrap resampling patients. A setting whose folds all tested the same held-out "
                 "slides (data.cv_protocol=study) is not pooled: its result is the mean ± sd over the fold models.")
    return "\n".join(lines) + "\n"
