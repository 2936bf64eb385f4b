"""Split-conformal sets: coverage near nominal on simulated data, the small-sample rule, referral."""

import math

import numpy as np
import pytest

from her2lab.eval.conformal import (
    conformal_threshold,
    empirical_coverage,
    min_calibration_slides,
    prediction_sets,
    referral,
    set_names,
)


def _simulate(rng, n, k=4, temperature=1.0):
    """Probabilities from a model and labels drawn from a *differently* tempered truth (miscalibrated)."""
    logits = rng.normal(0, 2.0, size=(n, k))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.exp(logits / temperature) / np.exp(logits / temperature).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in truth])
    return probs, labels


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("temperature", [1.0, 3.0])  # calibrated, and a badly overconfident model
def test_coverage_is_near_nominal_on_simulated_data(coverage, temperature):
    rng = np.random.default_rng(0)
    got = []
    for _ in range(40):
        cal_p, cal_y = _simulate(rng, 200, temperature=temperature)
        test_p, test_y = _simulate(rng, 500, temperature=temperature)
        q = conformal_threshold(cal_p, cal_y, coverage)
        got.append(empirical_coverage(prediction_sets(test_p, q), test_y))
    # marginal guarantee: coverage ≤ E[coverage] ≤ coverage + 1/(n+1)
    assert coverage - 0.01 <= np.mean(got) <= coverage + 1 / 201 + 0.01


def test_sets_grow_for_an_overconfident_model():
    rng = np.random.default_rng(1)
    sizes = {}
    for t in (1.0, 3.0):
        cal_p, cal_y = _simulate(rng, 500, temperature=t)
        sizes[t] = prediction_sets(cal_p, conformal_threshold(cal_p, cal_y, 0.9)).sum(1).mean()
    assert sizes[3.0] > sizes[1.0] + 0.3


def test_too_few_calibration_slides_give_every_class():
    p = np.array([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    q = conformal_threshold(p, np.array([0, 1, 0]), 0.9)
    assert q == math.inf
    assert prediction_sets(p, q).all()
    assert min_calibration_slides(0.9) == 9 and min_calibration_slides(0.8) == 4
    n = min_calibration_slides(0.9)
    assert conformal_threshold(np.full((n, 2), 0.5), np.zeros(n, int), 0.9) < math.inf


def test_threshold_is_the_ceil_quantile_of_the_scores():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]] * 5)
    y = np.array([0, 0, 1, 0] * 5)  # scores 0.1, 0.4, 0.3, 0.8 five times each
    q = conformal_threshold(p, y, 0.7)  # rank ceil(21*0.7)=15 of 20 sorted: 0.1×5, 0.3×5, 0.4×5 → 0.4
    assert q == pytest.approx(0.4)
    # a slide unlike every calibration slide gets the empty set
    assert set_names(prediction_sets(np.array([[0.65, 0.35], [0.5, 0.5]]), q), ["a", "b"]) == ["a", ""]


def test_referral_rule():
    clinical = {"0": "HER2-0", "1+": "HER2-low", "2+": "HER2-equivocal", "3+": "HER2-positive"}
    assert referral(["3+"], clinical, ["2+"]) == (False, "")
    assert referral(["1+", "2+"], clinical, ["2+"])[0]
    assert "HER2-equivocal / HER2-low" in referral(["1+", "2+"], clinical, ["2+"])[1]
    assert referral(["2+"], clinical, ["2+"]) == (True, "2+: confirm with a further test (e.g. ISH)")
    assert referral([], clinical)[0]
    # classes of one clinical category do not need a referral (3-way low = 1+ or 2+/ISH-)
    assert referral(["a", "b"], {"a": "low", "b": "low"}) == (False, "")


def test_coverage_ignores_unlabelled_and_rejects_bad_level():
    sets = np.array([[True, False], [False, True], [True, True]])
    assert empirical_coverage(sets, np.array([0, 0, -1])) == 0.5
    assert math.isnan(empirical_coverage(sets, np.array([-1, -1, -1])))
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_threshold(np.eye(2), np.array([0, 1]), 90)
