"""What evaluation checks before it reports a number: the split asked for, and that a new cohort is
new to the model, of its stain, and embedded the way its training data were.

Each check is a one-line error (or a warning where the cause may be innocent) naming the fix;
a number computed past one of them would mean something other than what it says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.data.cohort import load_manifest
from her2lab.data.inputs import inputs_for
from her2lab.errors import Her2labError, ManifestError

log = logging.getLogger(__name__)


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


def use_new_cohort(cfg: DictConfig, rcfg: DictConfig) -> dict:
    """Point the run's config at the new cohort (its paths resolve against the run's ``paths``);
    returns the run's own cohort config."""
    if not inputs_for(rcfg).has_cohort:
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


def not_seen_in_training(run_dir: Path, ran_cohort: dict, cohort: DictConfig, new: pd.DataFrame) -> None:
    """An external cohort holding slides the run trained or validated on would report optimistic
    numbers: an error. So is a slide id of the run's cohort naming another slide in the new one (the
    two cohorts' outputs could not be told apart). Shared patient ids (the same patients, e.g. the
    other stain's twin, or a coincidence of numbering) are a warning."""
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
    paths = dict(zip(old.slide_id, (str(Path(p).resolve()) for p in old.path), strict=True))
    clash = sorted(s for s, p in zip(new.slide_id, new.path, strict=True)
                   if s in paths and paths[s] != str(Path(p).resolve()))
    if clash:
        shown = ", ".join(clash[:5]) + (", …" if len(clash) > 5 else "")
        raise ManifestError(
            f"cohort {cohort.name} names other slides with the run's cohort's slide ids "
            f"({len(clash)}: {shown}); ids must name one slide: rename them in one manifest "
            "(a synthetic cohort: cohort.synthetic.id_prefix)")
    shared = sorted(set(seen.patient_id) & set(new.patient_id.astype(str)))
    if shared:
        log.warning("cohort %s shares %d patient id(s) with the run's training/validation slides (%s): "
                    "if they are the same patients, the external metrics are optimistic",
                    cohort.name, len(shared), ", ".join(shared[:5]))


def same_features(ran: Path, now: Path) -> None:
    """Features of the evaluated slides must come from the encoder (and weights, tile size and
    resolution) the model was trained on."""
    if not ran.exists() or not now.exists():
        return
    a, b = json.loads(ran.read_text()), json.loads(now.read_text())
    diff = [f"{k}={b[k]!r} (trained on {a[k]!r})" for k in a if k != "folder" and k in b and a[k] != b[k]]
    if diff:
        raise Her2labError(f"features in {b.get('folder')} were made differently from the run's: {', '.join(diff)}; "
                           "extract them with the run's backbone")


def same_splits(ran: Path, now: Path) -> None:
    """The run's own cohort must split as it did in training (same slides, same folds)."""
    if not ran.exists():
        return
    a = pd.read_csv(ran, dtype=str).sort_values("slide_id").reset_index(drop=True)
    b = pd.read_csv(now, dtype=str).sort_values("slide_id").reset_index(drop=True)
    if not a[["slide_id", "split"]].equals(b[["slide_id", "split"]]):
        raise Her2labError(f"the cohort's splits differ from the run's ({ran}): has the manifest changed since training?")
