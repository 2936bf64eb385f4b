"""HER2-ultralow: the manifest's her2_ultralow column and the her2_ultralow label scheme."""

from __future__ import annotations

import pandas as pd
import pytest

from her2lab.data.cohort import load_manifest
from her2lab.data.labels import label_scheme
from her2lab.errors import ManifestError

HEADER = "slide_id,patient_id,path,her2_score,her2_ultralow\n"


def _write(tmp_path, text):
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_the_scheme_encodes_a_manifest_with_aliases(tmp_path):
    rows = [
        "a,P1,a.svs,0,no",
        "b,P2,b.svs,0,Yes",
        "c,P3,c.svs,0+,ultralow",
        "d,P4,d.svs,0,null",
        "e,P5,e.svs,0,TRUE",
        "f,P6,f.svs,0,0",
        "g,P7,g.svs,0,y",
        "h,P8,h.svs,0,false",
        "i,P9,i.svs,1+,",
        "j,P10,j.svs,2+,no",  # no on a score above 0 is harmless: not ultralow
        "k,P11,k.svs,3,n",
        "l,P12,l.svs,0,HER2-ultralow",
    ]
    df = load_manifest(_write(tmp_path, HEADER + "\n".join(rows) + "\n"))
    assert list(df.her2_ultralow) == ["no", "yes", "yes", "no", "yes", "no", "yes", "no", "", "no", "no", "yes"]
    scheme = label_scheme("her2_ultralow")
    assert scheme.classes == ("0-null", "ultralow", "1+", "2+", "3+")
    assert scheme.encode(df).tolist() == [0, 1, 1, 0, 1, 0, 1, 0, 2, 3, 4, 1]


def test_without_the_column_it_is_empty_and_other_schemes_are_unchanged(tmp_path):
    df = load_manifest(_write(tmp_path, "slide_id,patient_id,path,her2_score\na,P1,a.svs,1+\nb,P2,b.svs,3+\n"))
    assert list(df.her2_ultralow) == ["", ""]
    assert label_scheme("her2_ultralow").encode(df).tolist() == [2, 4]  # no score-0 slide: nothing missing
    assert label_scheme("her2_4way").encode(df).tolist() == [1, 3]


def test_empty_scores_are_unlabelled_minus_one_without_error():
    # Unlabelled slides (empty her2_score) are -1 whatever their her2_ultralow, and never checked.
    m = pd.DataFrame({"slide_id": ["a", "b", "c", "d", "e"], "her2_score": ["0", "", "", "3+", "0"],
                      "her2_ultralow": ["yes", "", "yes", "", "no"]}, index=[10, 11, 12, 13, 14])
    y = label_scheme("her2_ultralow").encode(m)
    assert y.tolist() == [1, -1, -1, 4, 0] and list(y.index) == [10, 11, 12, 13, 14]


def test_a_score_0_slide_without_a_value_is_one_error_naming_slides_and_fix(tmp_path):
    df = load_manifest(_write(tmp_path, HEADER + "a,P1,a.svs,0,yes\nb,P2,b.svs,0,\nc,P3,c.svs,0,na\nd,P4,d.svs,1+,\n"))
    with pytest.raises(ManifestError) as err:
        label_scheme("her2_ultralow").encode(df)
    msg = str(err.value)
    assert "labels=her2_ultralow: score-0 slide(s) b, c have no her2_ultralow value" in msg
    assert "add her2_ultralow=yes" in msg and "\n" not in msg


def test_yes_on_a_score_above_0_is_one_error_naming_the_slides(tmp_path):
    p = _write(tmp_path, HEADER + "a,P1,a.svs,0,yes\nb,P2,b.svs,2+,yes\nc,P3,c.svs,3+,ultralow\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert f"{p}: her2_ultralow=yes on slide(s) b, c (line(s) 3, 4) whose her2_score is not 0" in msg
    assert "subcategory of IHC 0" in msg and "\n" not in msg
    # A frame that did not come through load_manifest gets the same refusal from the scheme.
    m = pd.DataFrame({"slide_id": ["a", "b"], "her2_score": ["0", "2+"], "her2_ultralow": ["no", "yes"]})
    with pytest.raises(ManifestError, match=r"labels=her2_ultralow: slide\(s\) b have her2_ultralow=yes"):
        label_scheme("her2_ultralow").encode(m)


def test_an_unknown_value_is_one_error(tmp_path):
    p = _write(tmp_path, HEADER + "a,P1,a.svs,0,maybe\n")
    with pytest.raises(ManifestError, match=r"unknown her2_ultralow 'maybe' on line\(s\) 2; use yes, no or leave empty$"):
        load_manifest(p)
