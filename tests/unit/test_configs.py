"""Every option of every config group composes, and the models instantiate."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from her2lab import CONF_DIR
from tests.helpers import compose_config

GROUPS = ["cohort", "labels", "backbone", "data", "model", "trainer", "logger", "experiment",
          "tiling", "tissue", "hparams_search", "callbacks", "extras", "debug"]


def _options(group: str) -> list[str]:
    """A group's options; ``_``-prefixed files are bases the options pull in, not options."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(config: str, overrides: list[str]):
    return compose_config(config_name=config, overrides=[*overrides, "paths.output_dir=/tmp/her2lab-compose"])


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    config = "train"
    overrides = [f"{group}={option}"]
    if group == "data" and option == "patch_folder":
        overrides.append("data.module.root=/tmp/patches")
    if group == "backbone" and option == "timm":
        overrides.append("backbone.name=resnet18")
    if group == "cohort" and option == "custom":
        overrides.append("cohort.manifest=/tmp/manifest.csv")
    cfg = _compose(config, overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    key = {"experiment": "task_name", "debug": "task_name",
           "hparams_search": "optimized_metric"}.get(group, group)
    assert resolved[key]
    if group == "tiling" and option != "backbone":  # prepare has no backbone to follow
        assert OmegaConf.to_container(_compose("prepare", overrides).tiling, resolve=True) == resolved["tiling"]


@pytest.mark.parametrize("model", ["abmil", "meanpool", "maxpool"])
@pytest.mark.parametrize("labels", ["her2_4way", "her2_3way", "binary", "her2_ultralow"])
@pytest.mark.parametrize("ordinal", [False, True])
def test_mil_models_instantiate_and_run(model, labels, ordinal):
    cfg = _compose("train", [f"model={model}", f"labels={labels}", f"model.net.ordinal={ordinal}"])
    module = instantiate(cfg.model)
    x = torch.randn(2, 7, cfg.backbone.embed_dim)
    mask = torch.ones(2, 7, dtype=torch.bool)
    logits, weights = module(x, mask)
    k = cfg.labels.num_classes
    assert logits.shape == (2, k - ordinal) and torch.allclose(weights.sum(1), torch.ones(2))
    probs = module.probs(logits)
    assert probs.shape == (2, k) and torch.allclose(probs.sum(1), torch.ones(2))
    assert module.ordinal == ordinal


@pytest.mark.parametrize("labels", _options("labels"))
def test_every_label_scheme_names_clinical_categories_and_referrals(labels):
    from her2lab.data.labels import label_scheme

    cfg = _compose("train", [f"labels={labels}"])
    classes = [str(c) for c in cfg.labels.classes]
    assert classes == list(label_scheme(cfg.labels.name).classes) and cfg.labels.num_classes == len(classes)
    assert [str(k) for k in cfg.labels.clinical] == classes  # every class, in order, has a category
    assert all(str(v).startswith("HER2-") for v in cfg.labels.clinical.values())
    assert set(cfg.labels.refer_always) <= set(classes)
    assert cfg.model.num_classes == len(classes) and list(cfg.model.class_names) == classes


def test_the_ultralow_scheme_composes():
    cfg = _compose("train", ["labels=her2_ultralow", "cohort=demo_ihc_ultralow"])
    assert cfg.labels.name == "her2_ultralow" and cfg.model.net.num_classes == 5
    assert dict(cfg.labels.clinical) == {"0-null": "HER2-null", "ultralow": "HER2-ultralow", "1+": "HER2-low",
                                         "2+": "HER2-equivocal", "3+": "HER2-positive"}
    assert list(cfg.labels.refer_always) == ["2+"] == list(_compose("train", []).labels.refer_always)
    assert list(_compose("train", ["labels=her2_3way"]).labels.refer_always) == []


@pytest.mark.parametrize("exp", ["paper_a_hne", "paper_a_ihc", "paper_a_imagenet"])
def test_paper_a_is_the_studys_setting(exp):
    cfg = _compose("train", [f"experiment={exp}"])
    assert cfg.backbone.name == "alexnet" and cfg.backbone.input_px == 96 and cfg.backbone.embed_dim == 1024
    assert cfg.data.module.bag_size == 100 and cfg.data.n_folds == 5 and cfg.trainer.max_epochs == 50
    assert cfg.model.optimizer.lr == 1e-3 and cfg.model.optimizer.weight_decay == 1e-7
    net = instantiate(cfg.model.net)
    assert net.attn_u is None and net.attn_v.in_features == 1024 and net.attn_v.out_features == 256
    assert cfg.task_name == exp  # experiment values win over train.yaml's


@pytest.mark.parametrize("exp", ["paper_a_hne", "paper_a_ihc", "paper_a_imagenet"])
def test_paper_a_runs_the_studys_protocol(exp):
    cfg = _compose("train", [f"experiment={exp}"])
    assert cfg.model_selection == "last" and cfg.data.cv_protocol == "study"
    assert dict(cfg.data.module.sampler) == {"kind": "with_replacement", "iterations": 100} and cfg.data.module.batch_size == 64
    assert cfg.eval.bag_sampling.enabled and (cfg.eval.bag_sampling.n_bags, cfg.eval.bag_sampling.bag_size) == (1600, 100)
    assert cfg.extract.augment_views == 8
    assert (cfg.backbone.mean is None) == (exp != "paper_a_imagenet")  # the pretraining tiles' own mean/std
    default = _compose("train", [])
    assert default.model_selection == "best_val" and default.data.cv_protocol == "patient_grouped"
    assert default.data.module.sampler.kind == "one_pass" and not default.eval.bag_sampling.enabled
    assert default.extract.augment_views == 0


def test_pretrain_experiments_export_where_the_preset_looks():
    for exp, bb in [("pretrain_hne", "hne"), ("pretrain_ihc", "ihc"), ("pretrain_hne", "alexnet_hne")]:
        cfg = _compose("train", [f"experiment={exp}", f"backbone={bb}"])
        assert cfg.export_encoder == cfg.backbone.weights and Path(cfg.backbone.weights).name == f"{bb}.safetensors"
        assert cfg.cohort.name != "demo"  # never the MIL cohort


def test_paper_b_experiments_share_cohort_labels_and_folds():
    cfgs = [_compose("train", [f"experiment=paper_b_{m}"]) for m in ("convnext", "mil", "patch")]
    for cfg in cfgs:
        assert cfg.cohort.name == "demo_ihc" and cfg.labels.name == "her2_3way" and cfg.labels.num_classes == 3
        assert cfg.data.n_folds == 5 and cfg.seed == cfgs[0].seed
    assert [c.data._target_.rsplit(".", 1)[1] for c in cfgs] == ["ThumbnailInputs", "BagInputs", "PatchInputs"]
    assert cfgs[0].model.net.name.startswith("convnext") and cfgs[2].model.aggregate == "mean"


def _without(cfg, *keys: str) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in keys:
        resolved.pop(key)
    return resolved


@pytest.mark.parametrize("encoder", ["hne", "ihc", "imagenet"])
def test_paper_a_sweeps_the_encoder_and_the_thin_experiments_equal_it(encoder):
    swept = _compose("train", ["experiment=paper_a", f"backbone=alexnet_{encoder}"])
    thin = _compose("train", [f"experiment=paper_a_{encoder}"])
    assert swept.backbone.preset == thin.backbone.preset == f"alexnet_{encoder}"
    assert _without(swept, "task_name", "tags") == _without(thin, "task_name", "tags")
    assert list(swept.tags) == ["paper_a", f"alexnet_{encoder}"] and list(thin.tags) == ["paper_a", encoder]


def test_paper_a_defaults_to_the_hne_encoder():
    assert _compose("train", ["experiment=paper_a"]).backbone.preset == "alexnet_hne"


@pytest.mark.parametrize("config", ["train", "extract"])
def test_tiling_follows_the_backbone_unless_a_tiling_is_named(config):
    cfg = _compose(config, ["backbone=alexnet_hne"])
    assert (cfg.tiling.patch_px, cfg.tiling.target_mpp) == (cfg.backbone.input_px, cfg.backbone.target_mpp) == (96, 0.5)
    cfg = _compose(config, ["backbone=hne", "tiling=paper_a"])
    assert OmegaConf.to_container(cfg.tiling, resolve=True) == OmegaConf.to_container(
        _compose("prepare", ["tiling=paper_a"]).tiling, resolve=True)
    assert cfg.tiling.patch_px == 96


def test_tiling_min_tissue_is_the_one_source_for_patch_data():
    cfg = _compose("train", ["data=patches", "tiling.min_tissue=0.8"])
    assert cfg.data.min_tissue == cfg.tiling.min_tissue == 0.8
    assert _compose("train", ["data=patches"]).data.min_tissue == 0.5


@pytest.mark.parametrize(
    "cohort", ["demo", "demo_ihc", "demo_ihc_ultralow", "demo_external", "pretrain_hne", "pretrain_ihc"]
)
def test_synthetic_cohorts_live_under_their_own_name(cohort):
    cfg = _compose("prepare", [f"cohort={cohort}", "paths.data_dir=/d"])
    assert cfg.cohort.name == cohort and cfg.cohort.root == f"/d/{cohort}" == cfg.cohort.cache_dir
    assert cfg.cohort.manifest == f"/d/{cohort}/manifest.csv" and cfg.cohort.synthetic.stain == cfg.cohort.stain
    assert (cfg.cohort.synthetic.width_px, cfg.cohort.synthetic.height_px, cfg.cohort.synthetic.mpp) == (4096, 3072, 0.5)


@pytest.mark.parametrize(("model", "net"), [("meanpool", "MeanPoolMIL"), ("maxpool", "MaxPoolMIL")])
def test_pooling_heads_share_the_mil_settings_but_not_the_attention(model, net):
    pooled, abmil = _compose("train", [f"model={model}"]).model, _compose("train", ["model=abmil"]).model
    assert pooled.net._target_.endswith(net) and "gated" not in pooled.net and "attn_dim" not in pooled.net
    assert _without(pooled, "net") == _without(abmil, "net")


DEBUG = {
    "default": {},
    "fdr": {"fast_dev_run": True},
    "overfit": {"overfit_batches": 2},
    "limit": {"limit_train_batches": 2, "limit_val_batches": 4, "limit_test_batches": 4},
    "profiler": {},
}


def _trainer(cfg):
    """The config's Trainer; the global switch ``deterministic`` turns on is put back afterwards."""
    import os

    was, env = (
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        return instantiate(cfg.trainer)
    finally:
        torch.use_deterministic_algorithms(was)
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("option", _options("debug"))
def test_debug_options_make_a_small_local_run_that_lightning_accepts(option):
    from pytorch_lightning.profilers import SimpleProfiler

    # debug comes last: it wins over an experiment and a GPU trainer (a logger named on the
    # command line wins over debug's)
    cfg = _compose("train", ["experiment=paper_a", "trainer=gpu", f"debug={option}"])
    assert cfg.task_name == "debug" and list(cfg.tags) == ["debug"] and list(cfg.logger) == ["csv"]
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.precision, t.deterministic, t.detect_anomaly) == (
        "cpu",
        1,
        "32-true",
        True,
        True,
    )
    assert {k: t[k] for k in DEBUG[option]} == DEBUG[option]
    assert t.max_epochs == {"overfit": 50, "limit": 3}.get(option, 1)
    assert not cfg.extras.enforce_tags
    trainer = _trainer(cfg)  # Lightning takes every setting
    assert trainer.fast_dev_run == (option == "fdr") and trainer.overfit_batches == DEBUG[
        option
    ].get("overfit_batches", 0)
    if option == "limit":
        assert (
            trainer.limit_train_batches,
            trainer.limit_val_batches,
            trainer.limit_test_batches,
        ) == (2, 4, 4)
    if option == "profiler":
        assert (
            isinstance(trainer.profiler, SimpleProfiler)
            and cfg.trainer.profiler.dirpath == cfg.paths.output_dir
        )
    assert list(_compose("train", [f"debug={option}", "logger=many"]).logger) == [
        "csv",
        "wandb",
        "tensorboard",
    ]


@pytest.mark.parametrize("option", ["fdr", "limit"])
def test_debug_runs_land_under_the_log_dirs_debug_folder_at_debug_level(option):
    from hydra import compose, initialize_config_dir

    from her2lab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            [f"debug={option}", "trainer=ddp", "paths.log_dir=/l"],
            return_hydra_config=True,
        )
    assert cfg.hydra.run.dir.startswith("/l/debug/runs/") and cfg.hydra.sweep.dir.startswith(
        "/l/debug/multiruns/"
    )
    assert list(cfg.hydra.verbose) == ["her2lab"]
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == (
        "auto",
        1,
        1,
    )  # one process


def test_a_debug_run_never_exports_an_encoder():
    assert _compose("train", ["experiment=pretrain_hne"]).export_encoder
    assert _compose("train", ["experiment=pretrain_hne", "debug=fdr"]).export_encoder is None


def test_no_debug_and_default_extras_by_default():
    cfg = _compose("train", [])
    assert "fast_dev_run" not in cfg.trainer and cfg.task_name == "train"
    assert dict(cfg.extras) == {
        "print_config": True,
        "enforce_tags": False,
        "ignore_warnings": False,
    }


def test_the_placeholder_tags_are_train_yamls():
    from her2lab.run.extras import PLACEHOLDER_TAGS

    assert tuple(_compose("train", []).tags) == PLACEHOLDER_TAGS


def test_early_stopping_joins_the_default_callbacks_and_follows_the_checkpoints_metric():
    from pytorch_lightning.callbacks import EarlyStopping

    cfg = _compose(
        "train", ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=3"]
    )
    assert list(cfg.callbacks) == ["model_checkpoint", "last_checkpoint", "early_stopping"]
    es = instantiate(cfg.callbacks.early_stopping)
    assert isinstance(es, EarlyStopping) and es.patience == 3
    assert (
        (es.monitor, es.mode)
        == (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode)
        == ("val/auroc", "max")
    )
    moved = _compose(
        "train",
        [
            "callbacks=[default,early_stopping]",
            "callbacks.model_checkpoint.monitor=val/loss",
            "callbacks.model_checkpoint.mode=min",
        ],
    ).callbacks.early_stopping
    assert (moved.monitor, moved.mode) == ("val/loss", "min")
    alone = _compose("train", ["callbacks=early_stopping"]).callbacks
    assert list(alone) == ["early_stopping"] and (
        alone.early_stopping.monitor,
        alone.early_stopping.mode,
    ) == ("val/auroc", "max")
    assert "early_stopping" not in _compose("train", []).callbacks
