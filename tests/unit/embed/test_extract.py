import json
import resource
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from her2lab.data.cohort import load_manifest
from her2lab.embed.backbones import BackboneSpec, build_encoder
from her2lab.embed.extract import ExtractSettings, extract_cohort
from her2lab.errors import OutputError, StaleCacheError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.reader import Slide
from her2lab.slides.tiling import TileReader, TilingParams, tile_geometry
from her2lab.slides.tissue import TissueParams
from tests.helpers import HAND_TILING, hand_manifest, hand_settings
from tests.helpers import read_features_file as _read

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


@pytest.fixture
def weights(r18_weights):
    return r18_weights


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


def test_prefetch_thread_gives_identical_files(prepared, weights, tmp_path):
    items, _ = prepared
    enc = build_encoder(_spec(weights=str(weights), pretrained=True))
    extract_cohort(items[:2], enc, tmp_path / "plain", ExtractSettings(batch_size=16, prefetch=False))
    extract_cohort(items[:2], enc, tmp_path / "thread", ExtractSettings(batch_size=16, prefetch=True))
    for sid, *_ in items[:2]:
        a, b = _read(tmp_path / "plain" / f"{sid}.h5"), _read(tmp_path / "thread" / f"{sid}.h5")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _encoder():
    import torch

    from her2lab.embed.backbones import BackboneSpec, build_encoder

    torch.manual_seed(0)
    return build_encoder(BackboneSpec(name="resnet18", input_px=64, target_mpp=2.0, pretrained=False, preset="r18"))


def _old_tiles_file(path: Path, slide: Path, **attrs) -> Path:
    """A tiles file as an older prepare wrote it for the 72 dpi slide: 0-px tiles."""
    with h5py.File(path, "w") as f:
        f["coords"] = np.zeros((4, 2), np.int64)
        f.attrs.update({
            "slide_id": slide.stem, "slide_path": str(slide), "slide_bytes": slide.stat().st_size,
            "level0_mpp": 352.78, "mpp_source": "openslide", "target_mpp": 2.0, "patch_px": 64,
            "patch_px_level0": 0, "stride_level0": 0.36, "read_level": 0, "read_px": 0,
            "tiling": HAND_TILING.name, "param_hash": "old", **attrs,
        })
    return path


def _prepared_good(slides: Path, tmp_path: Path) -> tuple:
    manifest = hand_manifest(tmp_path, [("good", str(slides / "good.tiff"), "")])
    settings = hand_settings(tmp_path / "cache")
    prepare_cohort(manifest, settings)
    return ("good", str(slides / "good.tiff"), None, settings.tiles_path("good"))


@pytest.mark.parametrize("kind", ["zero_px_tiles", "clam_patches", "bad_level"])
def test_extraction_isolates_a_bad_slide(slides, tmp_path, kind):
    from her2lab.embed.extract import extract_cohort

    good = _prepared_good(slides, tmp_path)
    bad_tiles = tmp_path / "bad.h5"
    if kind == "zero_px_tiles":
        _old_tiles_file(bad_tiles, slides / "dpi72.tiff")
    elif kind == "bad_level":  # plausible sizes, but a pyramid level the slide does not have
        _old_tiles_file(bad_tiles, slides / "dpi72.tiff", patch_px_level0=256, read_px=64, read_level=7,
                        stride_level0=256.0, level0_mpp=0.5)
    else:  # CLAM's create_patches_fp.py layout: a `coords` dataset with patch_level/patch_size attributes
        with h5py.File(bad_tiles, "w") as f:
            d = f.create_dataset("coords", data=np.array([[0, 0], [256, 0]], np.int64))
            d.attrs.update({"patch_level": 0, "patch_size": 256, "downsample": [1.0, 1.0]})
    items = [("dpi72", str(slides / "dpi72.tiff"), 0.5, bad_tiles), good]
    report = extract_cohort(items, _encoder(), tmp_path / "features").set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    msg = report.error["dpi72"]
    assert "\n" not in msg and ("bad.h5" in msg or "dpi72.tiff" in msg)
    assert "prepare" in msg  # the fix: re-run prepare
    why = {"zero_px_tiles": "tiles of 0 level-0 px", "clam_patches": "not a her2lab tiles file",
           "bad_level": "pyramid level 7 asked for, the slide has 2"}[kind]
    assert why in msg
    with h5py.File(tmp_path / "features" / "good.h5") as f:
        assert f["features"].shape == (len(f["coords"]), 512) and np.isfinite(f["features"][:]).all()


def test_peer_features_file_in_the_features_folder_is_named_not_mistaken(slides, tmp_path):
    from her2lab.embed.extract import extract_cohort

    good = _prepared_good(slides, tmp_path)
    out = tmp_path / "features"
    out.mkdir()
    with h5py.File(out / "good.h5", "w") as f:  # TRIDENT / CLAM features: no attributes at all
        f["features"] = np.zeros((3, 512), np.float32)
        f["coords"] = np.zeros((3, 2), np.int64)
    from her2lab.errors import StaleCacheError

    with pytest.raises(StaleCacheError) as err:
        extract_cohort([good], _encoder(), out)
    msg = str(err.value)
    assert "\n" not in msg and "good.h5" in msg and "not made by her2lab" in msg and "extract.overwrite=true" in msg


def test_the_normalisation_stored_with_an_encoder_is_used_and_a_change_is_stale(prepared, tmp_path):
    from her2lab.embed.backbones import create_model, save_encoder

    items, _ = prepared
    mean, std = (0.7, 0.5, 0.65), (0.2, 0.25, 0.18)  # the pretraining tiles' own statistics
    torch.manual_seed(0)
    path = save_encoder(create_model(_spec()), _spec(mean=mean, std=std), tmp_path / "enc.safetensors")
    enc = build_encoder(_spec(weights=str(path), pretrained=True, mean=None, std=None))
    assert enc.spec.mean == mean and enc.spec.std == std
    extract_cohort(items[:1], enc, tmp_path / "f")
    feats, coords, attrs = _read(tmp_path / "f" / f"{items[0][0]}.h5")
    assert json.loads(attrs["transform"])["mean"] == list(mean)
    slide = Slide(items[0][1])
    x = torch.from_numpy(TileReader(slide, tile_geometry(slide, TILING)).read(coords[0]).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        want = enc((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(feats[:1].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # the same weights with another mean/std: the cached features are stale, not silently reused
    with pytest.raises(StaleCacheError, match=r"transform="):
        extract_cohort(items[:1], build_encoder(_spec(weights=str(path), pretrained=True)), tmp_path / "f")


def test_augmented_views_are_the_studys_transforms_reproducible_and_keyed(prepared, weights, tmp_path):
    from her2lab.embed.features_file import load_bag_views

    items, _ = prepared
    enc = build_encoder(_spec(weights=str(weights), pretrained=True))
    extract_cohort(items[:1], enc, tmp_path / "a", ExtractSettings(batch_size=16, augment_views=2))
    path = tmp_path / "a" / f"{items[0][0]}.h5"
    feats, views, _ = load_bag_views(path)
    _, _, attrs = _read(path)
    assert views.shape == (2, *feats.shape) and views.dtype == np.float16 and attrs["augment_views"] == 2
    augment = json.loads(attrs["augment"])
    assert augment["color_jitter"]["hue"] == 0.1 and augment["random_affine"]["shear"] == 10
    assert augment["gaussian_noise"] == {"after": "normalisation", "p": 0.5, "std": 0.1}
    # the plain features are those of an extraction without views; each view differs from them and from the other
    extract_cohort(items[:1], enc, tmp_path / "plain", ExtractSettings(batch_size=16))
    plain, none, _ = load_bag_views(tmp_path / "plain" / f"{items[0][0]}.h5")
    assert none is None and np.array_equal(plain, feats)
    assert not np.allclose(views[0], feats, atol=1e-2) and not np.allclose(views[0], views[1], atol=1e-2)
    # every tile got its own transform: the change differs from tile to tile
    change = np.abs(views[0].astype(np.float32) - feats.astype(np.float32)).mean(1)
    assert change.std() > 0.05 * change.mean()
    # the same views again (seeded per slide, tile and view), whatever the batch's other work
    extract_cohort(items[:1], enc, tmp_path / "b", ExtractSettings(batch_size=16, augment_views=2))
    assert np.array_equal(load_bag_views(tmp_path / "b" / f"{items[0][0]}.h5")[1], views)
    # a file with views is not taken for one without (nor the reverse): K is part of the key
    with pytest.raises(StaleCacheError, match="augment_views=2 .now 0"):
        extract_cohort(items[:1], enc, tmp_path / "a", ExtractSettings(batch_size=16))


def test_study_augment_moves_each_tile_on_its_own_and_fills_with_grey():
    from her2lab.embed.augment import StudyAugment

    aug = StudyAugment()
    tiles = torch.zeros((6, 48, 48, 3), dtype=torch.uint8)
    tiles[:, 16:32, 16:32] = 200  # the same tile six times: a grey square on black
    torch.manual_seed(0)
    out = aug.pixels(tiles)
    assert out.shape == (6, 3, 48, 48) and out.dtype == torch.uint8
    # six identical tiles, six different results: every tile drew its own parameters
    assert len({o.numpy().tobytes() for o in out}) == 6
    # what the affine moves in from outside the tile is the study's fill, grey 245 (then jittered)
    assert (out == 0).float().mean() < 0.95
    assert any((o[:, 0, 0] > 150).all() or (o[:, -1, -1] > 150).all() for o in out)
    torch.manual_seed(0)
    assert torch.equal(aug.pixels(tiles), out)  # seeded: the same views
