"""The explanation step of training and evaluation: the inputs' explainer on the tested slides,
after the metrics are on disk, its failure logged and never fatal."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from her2lab.data.inputs import Inputs
from her2lab.errors import her2lab_cause
from her2lab.explain.explainers import Explanation, get_explainer

log = logging.getLogger("her2lab")


@contextlib.contextmanager
def explanations_guard(what: str, written: Path) -> Iterator[None]:
    """Run an explanation step (heatmaps, Grad-CAM) whose failure is logged, never fatal: the
    metrics (``written``) are on disk before it starts, and the run or evaluation still succeeds.

    A :class:`Her2labError` is one warning line; anything else is logged with its traceback.
    """
    try:
        yield
    except Exception as exc:
        cause = her2lab_cause(exc)
        if cause is not None:
            log.warning("%s left out: %s (%s is written)", what, cause, written)
        else:
            log.exception("%s failed (%s is written); the rest of the run is unaffected", what, written)


def explain_tested(inputs: Inputs, module, dataset, run_cfg: DictConfig, out_dir: Path, options: DictConfig | dict | None,
                   training: bool = False) -> Explanation:
    """The inputs' explainer on ``dataset`` (the tested slides), writing under ``out_dir``.

    Nothing when the inputs name no explainer, ``options.enabled`` is false, or (``training``)
    the explainer runs in evaluation only; an empty :class:`Explanation` when it fails.
    """
    options = dict(options or {})
    if inputs.explainer is None or not options.get("enabled", True):
        return Explanation()
    explainer = get_explainer(inputs.explainer)
    if training and not (explainer.in_training and getattr(module, "test_outputs", None)):
        return Explanation()
    result = Explanation()
    with explanations_guard(explainer.what, out_dir / "metrics.json"):
        result = explainer.fn(module, dataset, run_cfg, out_dir, options)
    return result
