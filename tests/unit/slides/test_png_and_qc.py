import io
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

from her2lab.slides import thumbnails
from her2lab.slides.thumbnails import encode_png, save_png, tile_squares


def _decode(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The PNG as OpenCV and as Pillow read it (RGB or grey)."""
    cv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if cv.ndim == 3:
        cv = cv2.cvtColor(cv, cv2.COLOR_BGR2RGB)
    return cv, np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (7, 5, 3), (300, 201, 3), (64, 33)])
def test_png_is_lossless_for_opencv_and_pillow(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for got in _decode(encode_png(img)):
        assert got.shape == img.shape and (got == img).all()


def test_png_of_a_view_and_the_opencv_fallback(tmp_path, monkeypatch):
    img = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)[
        ::2, 5:
    ]  # not contiguous
    save_png(tmp_path / "a.png", img)
    assert (_decode((tmp_path / "a.png").read_bytes())[1] == img).all()
    monkeypatch.setattr(
        thumbnails, "imagecodecs", SimpleNamespace(DEFLATE=SimpleNamespace(available=False))
    )
    assert (_decode(encode_png(img))[1] == img).all()
    with pytest.raises(ValueError, match="uint8"):
        encode_png(img.astype(np.float32))


@pytest.mark.parametrize(("side", "filled"), [(9, False), (6, False), (1, True), (4, True)])
def test_tile_squares_are_the_pixels_cv2_rectangle_draws(side, filled):
    h, w = 50, 60
    xy = np.array(
        [[-3, -2], [55, 45], [10, 10], [13, 12], [58, -8], [0, 0]]
    )  # overlapping, clipped
    ref = np.zeros((h, w), np.uint8)
    for x, y in xy:
        cv2.rectangle(
            ref, (int(x), int(y)), (int(x) + side - 1, int(y) + side - 1), 1, -1 if filled else 1
        )
    assert (tile_squares((h, w), xy, side, filled) == ref.astype(bool)).all()
    assert not tile_squares((h, w), np.zeros((0, 2), np.int64), side, filled).any()
