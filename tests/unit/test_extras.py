"""The ``extras`` group: the config tree, tags a run must have, silenced warnings."""

import warnings

import pytest

from her2lab.errors import Her2labError, one_line_errors
from her2lab.run.extras import apply_extras, enforce_tags, print_config_tree
from tests.helpers import compose_config


def _cfg(tmp_path, *overrides: str):
    return compose_config("train", [*overrides, f"paths.output_dir={tmp_path}"])


def test_print_config_shows_the_resolved_groups_and_saves_the_tree(tmp_path, capsys):
    apply_extras(_cfg(tmp_path, "model=meanpool", "tags=[a,b]"), tmp_path)
    saved = (tmp_path / "config_tree.log").read_text()
    shown = capsys.readouterr().out
    for text in (saved, shown):
        assert text.startswith("CONFIG")
        for group in (
            "cohort",
            "labels",
            "backbone",
            "data",
            "model",
            "trainer",
            "callbacks",
            "logger",
            "paths",
            "extras",
        ):
            assert f"── {group}\n" in text, group
        assert (
            "MeanPoolMIL" in text and f"dirpath: {tmp_path}/checkpoints" in text
        )  # resolved, not ${…}
        assert "task_name: train" in text and "── tags\n" in text and "- a\n" in text
        assert "${" not in text
    order = [
        saved.index(f"── {g}\n")
        for g in ("cohort", "data", "model", "trainer", "callbacks", "logger", "paths")
    ]
    assert order == sorted(order)


def test_print_config_off_and_other_ranks_print_nothing(tmp_path, capsys):
    apply_extras(_cfg(tmp_path, "extras.print_config=false"), tmp_path)
    apply_extras(_cfg(tmp_path), tmp_path, show=False)
    assert capsys.readouterr().out == "" and not (tmp_path / "config_tree.log").exists()


def test_print_config_tree_returns_the_plain_text(tmp_path):
    text = print_config_tree(_cfg(tmp_path, "trainer.max_epochs=7", "task_name=mine"))
    assert "max_epochs: 7" in text and "task_name: mine" in text
    assert "\x1b[" not in text  # no colour codes


@pytest.mark.parametrize("tags", ["[]", "[dev]"])
def test_enforce_tags_stops_a_run_without_its_own_tags(tmp_path, tags):
    cfg = _cfg(tmp_path, "extras.enforce_tags=true", f"tags={tags}")
    with pytest.raises(Her2labError, match=r"extras.enforce_tags .* tags=\[") as err:
        apply_extras(cfg, tmp_path)
    assert "\n" not in str(err.value)
    apply_extras(_cfg(tmp_path, f"tags={tags}"), tmp_path)  # off by default
    enforce_tags(_cfg(tmp_path, "tags=[abmil,lr-sweep]"))  # named: goes on
    enforce_tags(_cfg(tmp_path, "tags=[dev,abmil]"))


def test_enforce_tags_is_an_error_line_at_the_entry_point(tmp_path, capsys):
    cfg = _cfg(tmp_path, "extras.enforce_tags=true", "extras.print_config=false")
    with pytest.raises(SystemExit) as stop:
        one_line_errors(apply_extras)(cfg, tmp_path)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: extras.enforce_tags is on") and err.count("\n") == 1


def test_training_with_unnamed_tags_fails_before_any_work(tmp_path):
    from her2lab.run.train import train

    cfg = _cfg(tmp_path, "extras.enforce_tags=true", "paths.data_dir=/nonexistent")
    with pytest.raises(Her2labError, match="enforce_tags"):
        train(cfg)
    assert "enforce_tags" in (tmp_path / "failed.txt").read_text()  # what a sweep summary reads
    assert not (tmp_path / "config.yaml").exists()


def test_ignore_warnings_silences_python_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:  # the filters are put back on leaving
        warnings.simplefilter("always")
        apply_extras(_cfg(tmp_path, "extras.print_config=false"), tmp_path)
        warnings.warn("kept", UserWarning, stacklevel=1)
        apply_extras(
            _cfg(tmp_path, "extras.ignore_warnings=true", "extras.print_config=false"), tmp_path
        )
        warnings.warn("dropped", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["kept"]
