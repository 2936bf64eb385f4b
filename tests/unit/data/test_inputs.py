"""The data config's ``_target_`` picks what a run learns from, and the inputs name their explainer:
a new kind of data and a new explainer are each one class or function, taken up by name."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from her2lab.data.inputs import BagInputs, Inputs, PatchFolderInputs, ThumbnailInputs, inputs_for
from her2lab.errors import Her2labError
from her2lab.explain.explainers import (
    Explanation,
    get_explainer,
    register_explainer,
    unregister_explainer,
)
from her2lab.run.explanations import explain_tested


class CountingInputs(Inputs):
    """A made-up kind of data whose models are explained by the ``counting`` explainer."""

    explainer = "counting"


def _cfg(**data):
    return OmegaConf.create({"data": data, "labels": {"classes": ["a", "b"]}})


def test_the_data_target_builds_its_inputs():
    cfg = _cfg(_target_=f"{__name__}.CountingInputs")
    assert type(inputs_for(cfg)) is CountingInputs and inputs_for(cfg).cfg is cfg
    bags = inputs_for(_cfg(_target_="her2lab.data.inputs.BagInputs"))
    assert bags.explainer == "attention_maps" and bags.needs_encoder and bags.has_cohort
    assert not inputs_for(_cfg(_target_="her2lab.data.inputs.BagInputs", features_dir="/x")).needs_encoder
    assert not inputs_for(_cfg(_target_="her2lab.data.inputs.PatchFolderInputs")).has_cohort


@pytest.mark.parametrize(("kind", "cls"), [("bags", BagInputs), ("thumbnail", ThumbnailInputs),
                                           ("patch_folder", PatchFolderInputs)])
def test_an_older_run_config_with_only_data_kind_gets_the_same_inputs(kind, cls):
    assert type(inputs_for(_cfg(kind=kind))) is cls


@pytest.mark.parametrize(("data", "says"), [
    ({"_target_": "collections.OrderedDict"}, "not an her2lab.data.inputs.Inputs subclass"),
    ({"_target_": "her2lab.data.inputs.NoSuchInputs"}, "no such class"),
    ({"kind": "pixels"}, "data.kind='pixels' is not known"),
])
def test_a_data_target_that_is_not_inputs_is_one_line(data, says):
    with pytest.raises(Her2labError, match=says):
        inputs_for(_cfg(**data))


class _Module:
    def __init__(self) -> None:
        self.test_outputs = [{"index": 0, "label": 1, "probs": [0.2, 0.8]}]


def test_the_inputs_explainer_runs_after_testing_and_its_failure_is_not_fatal(tmp_path: Path, caplog):
    calls = []

    @register_explainer("counting", "slide counts", in_training=True)
    def count(module, dataset, run_cfg, out_dir, options):
        calls.append((len(dataset), out_dir, options["limit"]))
        if options.get("fail"):
            raise Her2labError("no slide to count")
        return Explanation(metrics={"slides_counted": float(len(dataset))})

    assert get_explainer("counting").what == "slide counts"
    inputs = inputs_for(_cfg(_target_=f"{__name__}.CountingInputs"))
    shown = explain_tested(inputs, _Module(), [1, 2, 3], inputs.cfg, tmp_path, {"limit": 2}, training=True)
    assert shown.metrics == {"slides_counted": 3.0} and calls == [(3, tmp_path, 2)]
    assert explain_tested(inputs, _Module(), [1], inputs.cfg, tmp_path, {"enabled": False, "limit": 1}).metrics == {}
    failed = explain_tested(inputs, _Module(), [1], inputs.cfg, tmp_path, {"limit": 1, "fail": True})
    assert failed.metrics == {} and "slide counts left out: no slide to count" in caplog.text
    unregister_explainer("counting")


def test_explainers_that_run_in_evaluation_only_are_left_out_of_training(tmp_path):
    inputs = inputs_for(_cfg(_target_="her2lab.data.inputs.BagInputs"))
    assert not get_explainer("attention_maps").in_training and get_explainer("gradcam").in_training
    assert explain_tested(inputs, _Module(), [], inputs.cfg, tmp_path, {}, training=True) == Explanation()
    with pytest.raises(Her2labError, match="explainer 'nope' is not registered; use one of .*attention_maps"):
        get_explainer("nope")
