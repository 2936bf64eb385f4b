from __future__ import annotations

from pathlib import Path

import pytest

from her2lab.data.cohort import check_slide_id, load_manifest
from her2lab.errors import ManifestError

HEADER = "slide_id,patient_id,path,her2_score,ish\n"


def _write(tmp_path, text):
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_valid_manifest_is_normalised(tmp_path):
    p = _write(tmp_path, HEADER + "a,P1,slides/a.svs,3,\nb,P1,/abs/b.svs,2+,Positive\nc,P2,c.svs, 1+ ,neg\n")
    df = load_manifest(p)
    assert list(df.her2_score) == ["3+", "2+", "1+"]
    assert list(df.ish) == ["", "pos", "neg"]
    assert df.path[0] == str(tmp_path / "slides" / "a.svs") and df.path[1] == "/abs/b.svs"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("slide_id,path,her2_score\na,a.svs,0\n", "missing column(s) patient_id"),
        (HEADER + "a,P1,a.svs,4+,\n", "unknown her2_score '4+' on line(s) 2"),
        (HEADER + "a,P1,a.svs,0,\nb,P2,b.svs,1+,\na,P3,c.svs,0,\n", "duplicate slide_id a on line(s) 2, 4"),
        (HEADER + "a,P1,a.svs,2+,maybe\n", "unknown ish 'maybe'"),
        (HEADER, "no rows"),
        (HEADER + ",P1,a.svs,0,\n", "empty slide_id on line(s) 2"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found; set cohort.manifest"):
        load_manifest(tmp_path / "nope.csv")


def test_mpp_column_and_override(tmp_path):
    p = _write(tmp_path, "slide_id,patient_id,path,her2_score,mpp\na,P1,a.svs,0,0.25\nb,P2,b.svs,0,\n")
    df = load_manifest(p, mpp_override=0.5)
    assert list(df.mpp) == [0.25, 0.5]  # the manifest's column wins over the cohort-wide override
    p = _write(tmp_path, "slide_id,patient_id,path,her2_score,mpp\na,P1,a.svs,0,abc\n")
    with pytest.raises(ManifestError, match="mpp must be a positive number"):
        load_manifest(p)


BARE_HEADER = "slide_id,patient_id,path,her2_score\n"
BAD_IDS = ["../../../../x", "/tmp/x", "a/b", "a\\b", "..", ".", "a\x07b", "a\tb", "x" * 201]


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- slide ids become file names ---------------------------------------------------------------
@pytest.mark.parametrize("sid", BAD_IDS)
def test_unsafe_slide_id_is_a_one_line_error_naming_the_line(tmp_path, sid):
    p = _write_text(tmp_path / "manifest.csv", BARE_HEADER + "ok1,P1,a.svs,0\n" + f'"{sid}",P2,b.svs,1+\n')
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert str(p) in msg and "on line 3" in msg and repr(sid) in msg and "\n" not in msg
    assert "slide ids may hold letters, digits" in msg
    with pytest.raises(ManifestError):
        check_slide_id(sid)


def test_all_unsafe_lines_are_named_and_safe_ids_pass(tmp_path):
    p = _write_text(tmp_path / "manifest.csv", BARE_HEADER + "ok,P1,a.svs,0\na/b,P2,b.svs,0\nc:d,P3,c.svs,0\n..,P4,d.svs,0\n")
    with pytest.raises(ManifestError, match=r"'a/b' on line 3 cannot name files \(it holds '/'\), nor can those on line\(s\) 4, 5"):
        load_manifest(p)
    # Ids of public cohorts and hand-typed ones are kept as they are.
    good = ["TCGA-A2-A0T2-01Z-00-DX1.8A2B0E5D-4E84-4C05-9D42-D5ACEB5CE9F4", "00012_train_2+", "HE 12-345 (A1)",
            "Schnitt_ä", "a..b", "x" * 200]
    rows = "".join(f"{s},P{i},s{i}.svs,0\n" for i, s in enumerate(good))
    assert list(load_manifest(_write_text(tmp_path / "good.csv", BARE_HEADER + rows)).slide_id) == good
    assert check_slide_id("case001_hne") == "case001_hne"


def test_ids_differing_only_in_case_are_refused(tmp_path):
    p = _write_text(tmp_path / "manifest.csv", BARE_HEADER + "S01,P1,a.svs,0\ns01,P2,b.svs,0\n")
    with pytest.raises(ManifestError, match=r"S01, s01 on line\(s\) 2, 3 differ only in case"):
        load_manifest(p)


# --- empty fields ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ("a,,a.svs,0\nb,P2,b.svs,0\nc,,c.svs,1+\n", "empty patient_id on line(s) 2, 4; fill them in"),
        ("a,P1,a.svs,\n", "empty her2_score on line(s) 2"),
        ("a,P1,,0\nb,,b.svs,0\n", "empty patient_id on line(s) 3; empty path on line(s) 2"),
        ("a,P1\n", "empty path on line(s) 2; empty her2_score on line(s) 2"),  # a short row
    ],
)
def test_empty_required_fields_are_one_line_errors(tmp_path, rows, needle):
    p = _write_text(tmp_path / "manifest.csv", BARE_HEADER + rows)
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    assert needle in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_a_column_given_twice_is_refused(tmp_path):
    # As Excel saves it (BOM, CRLF); pandas would read the first her2_score and drop the revised one.
    p = tmp_path / "manifest.csv"
    p.write_bytes("\ufeffslide_id,patient_id,path,her2_score,her2_score\r\nS1,P1,a.svs,0,3+\r\n".encode())
    with pytest.raises(ManifestError, match=r"column\(s\) her2_score appear more than once"):
        load_manifest(p)
    p.write_bytes("\ufeffslide_id,patient_id,path,her2_score\r\nS1,P1,a.svs,2\r\n".encode())
    df = load_manifest(p)
    assert list(df.columns[:4]) == ["slide_id", "patient_id", "path", "her2_score"] and list(df.her2_score) == ["2+"]
