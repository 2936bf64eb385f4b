"""Comparing runs on the same test slides."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score


def _run(folder, y, p1, patients):
    folder.mkdir(parents=True)
    ids = [f"s{i}" for i in range(len(y))]
    pd.DataFrame({"slide_id": ids, "label_index": y, "p_neg": 1 - p1, "p_pos": p1}).to_csv(folder / "predictions.csv", index=False)
    pd.DataFrame({"slide_id": ids, "patient_id": patients, "split": "test"}).to_csv(folder / "splits.csv", index=False)
    return folder


@pytest.mark.slow  # paired bootstraps of 300 resamples
def test_compare_finds_a_real_difference_and_none_between_twins(tmp_path):
    from her2lab.errors import Her2labError
    from her2lab.eval.compare import compare, markdown

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    patients = [f"P{i // 2}" for i in range(120)]
    weak = 1 / (1 + np.exp(-rng.normal(0.3 * y, 1.0)))
    strong = 1 / (1 + np.exp(-rng.normal(2.5 * y, 1.0)))
    a = _run(tmp_path / "a", y, weak, patients)
    b = _run(tmp_path / "b", y, strong, patients)
    twin = _run(tmp_path / "twin", y, weak, patients)
    t = compare([a, b, twin], n_boot=300)
    assert t.auroc[1] == pytest.approx(roc_auc_score(y, strong))
    assert t.auroc_diff[1] == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak))
    assert t.diff_lo[1] > 0 and t.p_value[1] < 0.05  # the strong model is better, and it shows
    assert t.auroc_diff[2] == 0 and t.p_value[2] == 1.0  # a model against itself
    assert "(reference)" in markdown(t)
    other = _run(tmp_path / "other", y, weak, patients)
    for f in ("predictions.csv", "splits.csv"):
        pd.read_csv(other / f).assign(slide_id=lambda d: "x" + d.slide_id).to_csv(other / f, index=False)
    with pytest.raises(Her2labError, match="share no test slide"):
        compare([a, other], n_boot=10)


def test_runs_of_different_cohorts_whose_slide_ids_coincide_are_not_paired(tmp_path):
    from omegaconf import OmegaConf

    from her2lab.errors import ManifestError
    from her2lab.eval.compare import compare

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 12)
    patients = [f"P{i}" for i in range(12)]
    runs = {}
    for name, seed in [("demo", 0), ("demo_again", 0), ("pretrain_hne", 1000)]:
        run = _run(tmp_path / name, y, rng.random(12), patients)
        cohort = {"name": "demo" if name == "demo_again" else name,
                  "manifest": f"/data/{name}/m.csv", "synthetic": {"seed": seed, "id_prefix": ""}}
        OmegaConf.save(OmegaConf.create({"task_name": name, "cohort": cohort}), run / "config.yaml")
        runs[name] = run
    # one cohort, in another data folder
    assert len(compare([runs["demo"], runs["demo_again"]], n_boot=5)) == 2
    want = (r"\(cohort demo\) and .*pretrain_hne \(cohort pretrain_hne\) are different cohorts "
            r"whose slide ids coincide \(12: s0, s1, s10, s11, s2, …\)")
    with pytest.raises(ManifestError, match=want) as err:
        compare([runs["demo"], runs["pretrain_hne"]], n_boot=5)
    assert "\n" not in str(err.value) and "cohort.synthetic.id_prefix" in str(err.value)
