"""The transfer-learning step around training: make a preset's encoder when its weights are
missing (run its ``pretrain_experiment`` first), and export a trained patch classifier's encoder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from her2lab.data.inputs import Inputs
from her2lab.embed.backbones import BackboneSpec, create_model, headless_state, save_encoder
from her2lab.errors import Her2labError

log = logging.getLogger(__name__)


def ensure_encoder(cfg: DictConfig, inputs: Inputs, run_dir: Path, train: Callable[[DictConfig], object]) -> None:
    """Make the backbone's weights first when the inputs need them, they are missing, and the
    preset says how (``backbone.pretrain_experiment``); ``train`` runs that experiment.

    ``python train.py backbone=hne`` on a fresh machine then runs ``experiment=pretrain_hne`` (the
    transfer-learning step, on its own cohort) before embedding the MIL cohort.
    """
    bb = cfg.backbone
    w, exp = bb.get("weights"), bb.get("pretrain_experiment")
    if not (cfg.get("auto_pretrain") and inputs.needs_encoder and exp and w and w != "hub") or Path(w).exists():
        return
    log.info("encoder weights %s missing: running experiment=%s (backbone=%s) first", w, exp, bb.preset)
    train(compose(
        config_name="train",
        overrides=[f"experiment={exp}", f"backbone={bb.preset}", f"paths.output_dir={run_dir / 'pretrain_encoder'}",
                   f"paths.data_dir={cfg.paths.data_dir}", f"seed={cfg.seed}"],
    ))
    if not Path(w).exists():
        raise Her2labError(f"experiment={exp} did not produce {w}; run it on its own to see why")


def export_encoder(module: pl.LightningModule, cfg: DictConfig, path: Path, run_dir: Path) -> Path:
    """Save the encoder part of the (best) patch classifier where ``backbone=…`` will find it, and
    a copy in the run folder (``encoder.safetensors``)."""
    spec = BackboneSpec(**{**OmegaConf.to_container(cfg.backbone, resolve=True), "weights": None, "pretrained": False})
    headless = create_model(spec)
    headless.load_state_dict(headless_state(module.net.cpu(), spec))
    extra = {"cohort": cfg.cohort.name, "labels": cfg.labels.name, "task_name": cfg.task_name, "run_dir": str(run_dir)}
    save_encoder(headless, spec, path, extra)
    save_encoder(headless, spec, run_dir / "encoder.safetensors", extra)
    log.info("encoder exported to %s (use: backbone=%s backbone.weights=%s)", path, spec.label, path)
    return path
