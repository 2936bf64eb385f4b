"""The training task: seed → inputs → model → fit → test the selected checkpoint → outputs on disk.

Which weights are tested is ``model_selection``: ``best_val`` (the default) the checkpoint with
the best validation metric (``callbacks.model_checkpoint``), ``last`` the weights of the last
epoch trained, as the H&E-HER2 study's code kept them (saved to ``checkpoints/last.ckpt``).

The ``data`` config's class (:mod:`her2lab.data.inputs`) makes the datamodule and names the
explainer; what lands in the run folder is described in :mod:`her2lab.eval.run_folder`. Loggers
are always closed, even on a crash, so a failed W&B run never leaks into the next multirun job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from her2lab.checkpoint import check_fits, check_resumable, data_only, load_checkpoint
from her2lab.config import build
from her2lab.data.bags import write_excluded_tiles
from her2lab.data.inputs import Inputs, inputs_for
from her2lab.errors import Her2labError, her2lab_cause
from her2lab.eval.run_folder import write_config, write_failure, write_json, write_predictions
from her2lab.io import ensure_writable_dir
from her2lab.lit.epoch_log import EpochLog
from her2lab.lit.history import ValidationHistory, selected_validation
from her2lab.lit.noise import quiet_third_party
from her2lab.plots import confusion_png
from her2lab.progress import on_terminal
from her2lab.run.encoder import ensure_encoder, export_encoder
from her2lab.run.explanations import explain_tested
from her2lab.run.extras import apply_extras
from her2lab.run.loggers import finish_loggers, instantiate_loggers, log_wandb_test

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns ``cfg.optimized_metric`` for sweeps.

    Under DDP every rank runs this function (Lightning relaunches the script); files are
    written by rank 0 only, and test predictions are gathered from all ranks. A failed run
    leaves its one-line error in ``failed.txt``.
    """
    run_dir = ensure_writable_dir(cfg.paths.output_dir, "run folder")
    (run_dir / "failed.txt").unlink(missing_ok=True)
    quiet_third_party()
    try:
        return _train(cfg, run_dir)
    except Exception as exc:
        if _is_rank_zero():  # the sweep summary reads this
            cause = her2lab_cause(exc)
            write_failure(run_dir, str(cause) if cause is not None else f"{type(exc).__name__}: {exc}")
        raise


def _train(cfg: DictConfig, run_dir: Path) -> float | None:
    apply_extras(cfg, run_dir, show=_is_rank_zero())  # tags, warnings, config tree: before any work
    selection = check_model_selection(str(cfg.get("model_selection") or "best_val"))
    resume = cfg.get("ckpt_path")
    if resume:  # read as data only, before any work: a file that would run code is refused here
        ckpt = load_checkpoint(resume)
        check_resumable(ckpt, resume)
    inputs = inputs_for(cfg)
    ensure_encoder(cfg, inputs, run_dir, train)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision("high")
    zero = _is_rank_zero()
    if zero:
        write_config(run_dir, cfg)
    dm = inputs.datamodule(run_dir)
    if zero:  # again, now that the data have said what they are (e.g. the feature size)
        write_config(run_dir, cfg)
    # Seeded again: making the data (e.g. building an encoder to extract features) draws random
    # numbers, and the model's initial weights must not depend on whether the features were cached.
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build(cfg.model)
    if resume:
        check_fits(module, ckpt["state_dict"], resume, "the configured model")
        del ckpt
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not any(isinstance(c, EpochLog) for c in callbacks):  # every epoch's metrics in the log file
        callbacks.append(EpochLog())
    callbacks.append(ValidationHistory())  # the selected epoch's val/* for metrics.json
    loggers = instantiate_loggers(cfg)
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                default_root_dir=str(run_dir), **_progress_bar_default(cfg.trainer))
    # fast_dev_run swaps the loggers for a dummy: the configured ones then log nothing (no W&B run)
    active = trainer.loggers if trainer.fast_dev_run else loggers
    try:
        hparams = OmegaConf.to_container(cfg, resolve=True)
        for lg in active:
            lg.log_hyperparams(hparams)  # the whole resolved config, so sweeps can be compared
        try:  # checkpoints are read as data only (see her2lab.checkpoint)
            with data_only():
                trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
        finally:  # tiles left out for non-finite features are listed even when the run stops
            if zero:
                write_excluded_tiles(dm, run_dir / "excluded_tiles.csv")
        metrics = _test_selected(trainer, module, dm, selection, run_dir / "checkpoints" / "last.ckpt")
        if zero:
            _write_outputs(cfg, inputs, module, dm, metrics, run_dir, active)
        return metrics.get(cfg.get("optimized_metric", ""))
    finally:
        finish_loggers(loggers)


MODEL_SELECTION = ("best_val", "last")


def check_model_selection(selection: str) -> str:
    if selection not in MODEL_SELECTION:
        raise Her2labError(f"model_selection={selection!r}: use {' or '.join(MODEL_SELECTION)}")
    return selection


def _test_selected(trainer: pl.Trainer, module: pl.LightningModule, dm: pl.LightningDataModule,
                   selection: str = "best_val", last_path: Path | None = None) -> dict:
    """Test the selected weights; the fit's and the test's metrics.

    ``best_val``: the best checkpoint (the last weights when there is none). ``last``: the weights
    the fit ended with, saved to ``last_path`` first so that evaluation finds what was tested.
    ``val/*`` are those of the tested weights' epoch (``selected_epoch``); ``train/*`` are the
    last epoch's.
    """
    check_model_selection(selection)
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    if trainer.fast_dev_run:  # Lightning saves no checkpoint in this mode
        log.info("fast_dev_run: no checkpoint was saved; testing the last weights on %s batch(es)",
                 int(trainer.fast_dev_run))
        best = None
    elif selection == "last":
        best = None
        if last_path is not None:  # the end of the fit, whether or not the last epoch validated
            trainer.save_checkpoint(last_path)
        log.info("model_selection=last: testing the weights of the last epoch (%d)", trainer.current_epoch - 1)
    elif best is None:
        log.warning("no best checkpoint (no validation metric?): testing the last weights")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # val/* of the selected epoch, not of the last one (a running best, *_best, stays as it ended)
    history = next(c for c in trainer.callbacks if isinstance(c, ValidationHistory))
    metrics = {k: v for k, v in metrics.items() if not k.startswith("val/") or k.endswith("_best")}
    selected = selected_validation(history, best, max(int(trainer.current_epoch) - 1, 0))
    metrics.update({k: v for k, v in selected.items() if not k.endswith("_best")})
    with data_only():  # the best checkpoint may predate a resume (an earlier version's file)
        # Lightning's table of the test metrics on a terminal; EpochLog logs them as one line
        ckpt_args = {"ckpt_path": best, "weights_only": True} if best else {}
        trainer.test(module, datamodule=dm, verbose=on_terminal(), **ckpt_args)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    metrics["best_checkpoint"] = best or (str(last_path) if selection == "last" and last_path and not trainer.fast_dev_run else "")
    metrics["model_selection"] = selection
    metrics["epochs_trained"] = int(trainer.current_epoch)
    if hasattr(module, "confusion"):
        metrics["test/confusion_matrix"] = module.confusion.compute().tolist()
    return metrics


def _write_outputs(cfg: DictConfig, inputs: Inputs, module: pl.LightningModule, dm: pl.LightningDataModule,
                   metrics: dict, run_dir: Path, loggers: list) -> None:
    """Predictions, confusion matrix and metrics; then explanations, W&B charts, the exported encoder."""
    classes = [str(c) for c in cfg.labels.classes] if cfg.get("labels") else None
    datasets = getattr(dm, "datasets", {})  # a patch folder has no slides to name
    tested = datasets.get("test", datasets.get("val"))
    if getattr(module, "test_outputs", None) and tested is not None:
        write_predictions(module.test_outputs, tested.records, list(cfg.labels.classes), cfg.fold,
                          run_dir / "predictions.csv")
    if "test/confusion_matrix" in metrics and classes:
        confusion_png(metrics["test/confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                      title=f"{cfg.task_name} fold {cfg.fold} (test)")
    write_json(run_dir / "metrics.json", metrics)  # before the explanations: their failure loses nothing
    shown = explain_tested(inputs, module, tested, cfg, run_dir, cfg.get("gradcam"), training=True)
    if "test/confusion_matrix" in metrics and classes:
        log_wandb_test(loggers, module, classes, run_dir / "predictions.csv", shown.images)
    if cfg.get("export_encoder"):
        export_encoder(module, cfg, Path(cfg.export_encoder), run_dir)
    log.info("run folder: %s", run_dir)


def _progress_bar_default(tcfg: DictConfig) -> dict:
    """Lightning's progress bar on a terminal only, unless ``trainer.enable_progress_bar`` says:
    in a batch job it would fill the log with carriage returns, and the epoch lines say enough."""
    if tcfg.get("enable_progress_bar") is not None:
        return {}
    return {"enable_progress_bar": on_terminal()}


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0
