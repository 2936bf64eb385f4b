import pytest

from her2lab.data.cohort import load_manifest
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
