import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from her2lab.data.cohort import load_manifest
from her2lab.embed.backbones import BackboneSpec, build_encoder, create_model
from her2lab.embed.extract import ExtractSettings, extract_cohort
from her2lab.errors import OutputError, StaleCacheError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.reader import Slide
from her2lab.slides.tiling import TileReader, TilingParams, tile_geometry
from her2lab.slides.tissue import TissueParams

TILING = TilingParams(target_mpp=2.0, patch_px=64, min_tissue=0.5)


def _spec(**kw):
    return BackboneSpec(**{"name": "resnet18", "input_px": 64, "target_mpp": 2.0, "pretrained": False, "preset": "r18", **kw})


@pytest.fixture(scope="module")
def prepared(hne_cohort, tmp_path_factory):
    root, _ = hne_cohort
    cache = tmp_path_factory.mktemp("cache")
    manifest = load_manifest(root / "manifest.csv").iloc[:4].reset_index(drop=True)
    settings = PrepareSettings(cache_dir=cache, tiling=TILING, tissue=TissueParams(), qc=False)
    prepare_cohort(manifest, settings, num_workers=2)
    items = [(r.slide_id, r.path, None, settings.tiles_path(r.slide_id)) for r in manifest.itertuples()]
    return items, cache


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.save(create_model(_spec()).state_dict(), path)
    return path


def _read(path):
    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def test_features_equal_a_direct_forward(prepared, weights, tmp_path):
    items, _ = prepared
    enc = build_encoder(_spec(weights=str(weights), pretrained=True))
    report = extract_cohort(items[:2], enc, tmp_path, ExtractSettings(batch_size=16))
    assert (report.status == "done").all()
    feats, coords, attrs = _read(tmp_path / f"{items[0][0]}.h5")
    assert feats.dtype == np.float16 and feats.shape == (len(coords), 512)
    assert attrs["encoder"] == "resnet18" and attrs["encoder_weights"] == "file" and attrs["pretrained"]
    assert attrs["patch_px"] == 64 and attrs["target_mpp"] == 2.0 and attrs["embed_dim"] == 512
    # the same tiles through the same model by hand
    slide = Slide(items[0][1])
    reader = TileReader(slide, tile_geometry(slide, TILING))
    idx = [0, len(coords) // 2, len(coords) - 1]
    x = torch.stack([torch.from_numpy(reader.read(coords[i]).copy()) for i in idx]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(enc.spec.mean).view(1, 3, 1, 1), torch.tensor(enc.spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = enc((x - mean) / std).numpy()
    np.testing.assert_allclose(feats[idx].astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_float32_storage_and_skip(prepared, tmp_path):
    items, _ = prepared
    enc = build_encoder(_spec())
    extract_cohort(items[:1], enc, tmp_path, ExtractSettings(dtype="float32"))
    feats, _, attrs = _read(tmp_path / f"{items[0][0]}.h5")
    assert feats.dtype == np.float32 and attrs["encoder_weights"] == "random" and not attrs["pretrained"]
    mtime = (tmp_path / f"{items[0][0]}.h5").stat().st_mtime_ns
    report = extract_cohort(items[:1], enc, tmp_path, ExtractSettings(dtype="float32"))
    assert list(report.status) == ["skipped"]
    assert (tmp_path / f"{items[0][0]}.h5").stat().st_mtime_ns == mtime


def test_stale_features_name_the_mismatch(prepared, weights, tmp_path):
    items, _ = prepared
    extract_cohort(items[:1], build_encoder(_spec(weights=str(weights), pretrained=True)), tmp_path)
    with pytest.raises(StaleCacheError, match=r"encoder_weights_sha256=.*extract.overwrite=true"):
        extract_cohort(items[:1], build_encoder(_spec()), tmp_path)
    report = extract_cohort(items[:1], build_encoder(_spec()), tmp_path, ExtractSettings(overwrite=True))
    assert list(report.status) == ["done"]


def test_nan_features_are_reported_and_others_finish(prepared, weights, tmp_path):
    items, _ = prepared
    state = torch.load(weights)
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    enc = build_encoder(_spec(weights=str(tmp_path / "nan.pt"), pretrained=True))
    report = extract_cohort(items[:2], enc, tmp_path / "out")
    assert (report.status == "failed").all()
    assert all("gave NaN/Inf features; check the encoder weights" in e for e in report.error)
    assert not list((tmp_path / "out").glob("*.h5"))


def test_bad_tiles_and_moved_slide(prepared, tmp_path):
    items, _ = prepared
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not hdf5")
    bad = [
        (items[0][0], items[0][1], None, corrupt),
        (items[1][0], str(tmp_path / "moved.tiff"), None, items[1][3]),
        items[2],
    ]
    report = extract_cohort(bad, build_encoder(_spec()), tmp_path / "out").set_index("slide_id")
    assert "corrupt tiles file" in report.error[items[0][0]] and "re-run prepare" in report.error[items[0][0]]
    assert "the slide moved" in report.error[items[1][0]]
    assert report.status[items[2][0]] == "done"


def test_encoder_input_size_must_match_tiles(prepared, tmp_path):
    items, _ = prepared
    report = extract_cohort(items[:1], build_encoder(_spec(input_px=96)), tmp_path)
    assert "tiles are 64px but the encoder takes 96px" in report.error[0]


def test_disk_full_mid_write_keeps_finished_slides(prepared, tmp_path):
    items, _ = prepared
    enc = build_encoder(_spec())
    extract_cohort(items[:1], enc, tmp_path)
    done = (tmp_path / f"{items[0][0]}.h5").read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # files may not grow past 20 kB
    try:
        with pytest.raises(OutputError, match="disk full.*finished slides are intact"):
            extract_cohort(items[:2], enc, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (tmp_path / f"{items[0][0]}.h5").read_bytes() == done
    assert not (tmp_path / f"{items[1][0]}.h5").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- the command line: kill + resume, and sharding across processes ----------------------------

def _cli(tmp_path: Path, weights: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "her2lab.extract", "cohort=demo", "cohort.synthetic.n_slides=4",
        "cohort.synthetic.n_pairs=1", "backbone=timm", "backbone.name=resnet18", f"backbone.weights={weights}",
        "backbone.preset=resnet18", "backbone.input_px=64", "backbone.target_mpp=2.0", "extract.batch_size=8",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", "prepare.qc=false", *args,
    ]


def _features(tmp_path: Path) -> dict[str, tuple]:
    folder = tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    return {p.stem: _read(p)[:2] for p in sorted(folder.glob("*.h5"))}


def test_killed_run_resumes_to_identical_files(tmp_path, weights):
    # Uninterrupted reference.
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, weights), check=True, capture_output=True, timeout=600)
    want = _features(ref)
    assert len(want) == 4
    # Same cohort, killed once the first slide is written, then run again.
    run = tmp_path / "run"
    shutil.copytree(ref / "data" / "demo", run / "data" / "demo", ignore=shutil.ignore_patterns("features"))
    proc = subprocess.Popen(_cli(run, weights), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = run / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    deadline = time.time() + 300
    while time.time() < deadline and not list(folder.glob("*.h5")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert 1 <= len(list(folder.glob("*.h5"))) < 4  # killed mid-cohort
    subprocess.run(_cli(run, weights), check=True, capture_output=True, timeout=600)
    got = _features(run)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k][0], want[k][0]) and np.array_equal(got[k][1], want[k][1])


def test_two_processes_shard_the_cohort_exactly_once(tmp_path, weights):
    single = tmp_path / "single"
    subprocess.run(_cli(single, weights), check=True, capture_output=True, timeout=600)
    want = _features(single)
    multi = tmp_path / "multi"
    shutil.copytree(single / "data" / "demo", multi / "data" / "demo", ignore=shutil.ignore_patterns("features"))
    procs = [
        subprocess.Popen(_cli(multi, weights, f"extract.shard={i}", "extract.num_shards=2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    folder = multi / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    reports = [pd.read_csv(folder / f"extract_report_shard{i}of2.csv") for i in range(2)]
    done = [sid for r in reports for sid in r.slide_id[r.status == "done"]]
    assert sorted(done) == sorted(want)  # every slide exactly once
    got = _features(multi)
    for k in want:
        assert np.array_equal(got[k][0], want[k][0])


@pytest.mark.slow
def test_submitit_local_launcher_shards_like_slurm(tmp_path, weights):
    # The SLURM recipe (docs/encoders.md) with the local submitit executor: two jobs, one per shard.
    cmd = _cli(tmp_path, weights, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               "extract.num_shards=2", "extract.shard=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    cmd.insert(3, "--multirun")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    reports = [pd.read_csv(folder / f"extract_report_shard{i}of2.csv") for i in range(2)]
    done = [sid for r in reports for sid in r.slide_id[r.status == "done"]]
    assert len(done) == 4 and len(set(done)) == 4
    assert len(list(folder.glob("*.h5"))) == 4


def test_prefetch_thread_gives_identical_files(prepared, weights, tmp_path):
    items, _ = prepared
    enc = build_encoder(_spec(weights=str(weights), pretrained=True))
    extract_cohort(items[:2], enc, tmp_path / "plain", ExtractSettings(batch_size=16, prefetch=False))
    extract_cohort(items[:2], enc, tmp_path / "thread", ExtractSettings(batch_size=16, prefetch=True))
    for sid, *_ in items[:2]:
        a, b = _read(tmp_path / "plain" / f"{sid}.h5"), _read(tmp_path / "thread" / f"{sid}.h5")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
