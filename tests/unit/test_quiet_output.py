"""Third-party noise is silenced narrowly, and the calibration plot warns about nothing."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _trainer_messages(lg: logging.Logger) -> list[str]:
    import pytorch_lightning as pl

    handler = _Records()
    lg.addHandler(handler)  # on Lightning's logger itself: it may not propagate to the root
    try:
        pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        lg.removeHandler(handler)
    return handler.messages


def test_lightning_tips_are_dropped_and_its_other_messages_kept(monkeypatch):
    import pytorch_lightning  # noqa: F401  (sets the logger below)
    from lightning_utilities.core import rank_zero

    from her2lab.lit.noise import quiet_third_party

    lg = rank_zero.log  # where Lightning's rank_zero_info writes
    monkeypatch.setattr(lg, "filters", [])  # as Lightning leaves it
    monkeypatch.setattr(lg, "level", logging.INFO)
    before = _trainer_messages(lg)
    assert any("litlogger" in m for m in before)  # the tip is there to drop
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter
    assert len(lg.filters) == 1
    after = _trainer_messages(lg)
    assert not any(m.startswith("💡 Tip:") for m in after)
    # the others stay, e.g. "GPU available: …"
    assert [m for m in before if not m.startswith("💡 Tip:")] == after


def test_the_pytree_deprecation_inside_lightning_is_ignored_and_no_other_warning():
    from pytorch_lightning.utilities._pytree import _tree_flatten

    from her2lab.lit.noise import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _tree_flatten(1)  # Lightning makes a deprecated LeafSpec here
        assert any("LeafSpec" in str(w.message) for w in seen)
        seen.clear()
        quiet_third_party()
        _tree_flatten(1)
        # not raised by Lightning: still shown
        warnings.warn("LeafSpec elsewhere", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["LeafSpec elsewhere"]


def test_calibration_plot_of_read_only_arrays_warns_nothing(tmp_path):
    from her2lab.plots import reliability_png

    p_a = [0.8, 0.3, 0.4, 0.6, 0.1]
    df = pd.DataFrame({"label_index": [0, 1, 1, 0, 1], "p_a": p_a, "p_b": [1 - p for p in p_a]})
    y, probs = df.label_index.to_numpy(), df[["p_a", "p_b"]].to_numpy(dtype=float)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # read-only, as pandas hands them out (copy on write)
        y.flags.writeable = probs.flags.writeable = False
        ece = reliability_png(y, probs, tmp_path / "calibration.png")
    assert [str(w.message) for w in seen] == []
    assert 0 <= ece <= 1 and (tmp_path / "calibration.png").exists()
    # the inputs are untouched
    assert np.array_equal(probs.argmax(1), [0, 1, 1, 0, 1]) and not probs.flags.writeable
