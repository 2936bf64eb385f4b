"""Every option of every config group composes, and the models instantiate."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from her2lab import CONF_DIR
from tests.helpers import compose_config

GROUPS = ["cohort", "labels", "backbone", "data", "model", "trainer", "logger", "experiment", "tiling", "tissue", "hparams_search"]


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
    key = {"experiment": "task_name", "hparams_search": "optimized_metric"}.get(group, group)
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
