"""Whole-slide thumbnails for end-to-end image models (the IHC-HER2 study's low-resolution path).

The images are the slide pipeline's own thumbnails (``thumbs/{mpp}mpp/{slide}.png``, made by the
prepare step at ``data.thumb_mpp``) — no second way of reading slides. Each is cropped to the
tissue's bounding box (the prepare step's tissue mask, plus a margin), scaled — ``fit: mpp``
keeps the thumbnail's µm/px and only shrinks what would not fit, ``fit: long_side`` scales the
tissue's long side to the input — and padded to a square of ``input_px`` with white glass, so the
aspect ratio is kept and all of the tissue is in view. Outside the tissue mask the image is set
to glass (``mask_background``), so pen marks, dust and black edges cannot become shortcuts.

Training augmentations suited to slides: the 8 dihedral transforms (flips, 90° rotations), a
modest stain jitter in HED space (Tellez et al. 2018: per-stain scale and shift of the optical
density; scikit-image's colour deconvolution) and a small scale change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from her2lab.data.bags import SlideLoaders
from her2lab.errors import Her2labError

log = logging.getLogger(__name__)

BACKGROUND = 255  # glass
DARK = 50  # no stained tissue is this dark at thumbnail resolution; black slide edges are
MIN_TISSUE_PX = 16  # a thumbnail whose tissue is smaller than this holds nothing to learn from


@dataclass
class ThumbRecord:
    slide_id: str
    thumb_path: str
    tiles_path: str  # the tissue mask lives there
    label: int


def read_tissue_mask(tiles_path: str) -> tuple[np.ndarray, float]:
    """The prepare step's tissue mask (bool) and its µm/px."""
    with h5py.File(tiles_path, "r") as f:
        return f["tissue_mask"][:].astype(bool), float(f.attrs["mask_mpp"])


def tissue_box(tiles_path: str, thumb_mpp: float, thumb_shape: tuple[int, int], margin_um: float) -> tuple[int, int, int, int]:
    """Tissue bounding box ``(x0, y0, x1, y1)`` in thumbnail pixels, with a margin, clipped."""
    return mask_box(*read_tissue_mask(tiles_path), tiles_path, thumb_mpp, thumb_shape, margin_um)


def mask_box(mask: np.ndarray, mask_mpp: float, where: str, thumb_mpp: float, thumb_shape: tuple[int, int],
             margin_um: float) -> tuple[int, int, int, int]:
    """:func:`tissue_box` of a mask already read (``where`` names its file in errors)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise Her2labError(f"{where}: empty tissue mask; re-run the prepare step")
    s = mask_mpp / thumb_mpp  # mask px → thumbnail px
    m = margin_um / thumb_mpp
    h, w = thumb_shape
    x0, y0 = max(0, int(np.floor(xs.min() * s - m))), max(0, int(np.floor(ys.min() * s - m)))
    x1, y1 = min(w, int(np.ceil((xs.max() + 1) * s + m))), min(h, int(np.ceil((ys.max() + 1) * s + m)))
    return x0, y0, x1, y1


def fit_square(img: np.ndarray, input_px: int, scale: float) -> np.ndarray:
    """Resize by ``scale`` (capped so the image fits) and pad to ``input_px``² with glass, centred."""
    h, w = img.shape[:2]
    scale = min(scale, input_px / max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((input_px, input_px, 3), BACKGROUND, np.uint8)
    y, x = (input_px - nh) // 2, (input_px - nw) // 2
    out[y : y + nh, x : x + nw] = img
    return out


def hed_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scale and shift each stain's optical density (H, E, DAB) by up to ``sigma``.

    Applied as the change it makes (jittered minus plain reconstruction), so that colours the
    H/E/DAB basis cannot represent (pen, black edges) are not shifted by the round trip itself.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3) * 0.05  # shifts in OD units are small
    delta = hed2rgb(hed * alpha + beta) - hed2rgb(hed)
    return np.clip(img + delta * 255 + 0.5, 0, 255).astype(np.uint8)


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


class ThumbnailDataset(Dataset):
    """item → (normalised image (3, S, S), label, index)."""

    def __init__(
        self,
        records: list[ThumbRecord],
        thumb_mpp: float,
        input_px: int,
        fit: str,
        margin_um: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        hed_sigma: float = 0.05,
        scale_jitter: float = 0.1,
        seed: int = 0,
        mask_background: bool = True,
    ) -> None:
        if fit not in ("mpp", "long_side"):
            raise Her2labError(f"data.module.fit={fit!r}: use mpp (keep µm/px) or long_side")
        self.records, self.input_px, self.fit, self.train = records, input_px, fit, train
        self.hed_sigma, self.scale_jitter, self.seed = hed_sigma, scale_jitter, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.epoch = 0
        self.mask_background = mask_background
        self.crops = [self._crop(r, thumb_mpp, margin_um) for r in records]  # small: kept in memory
        shrunk = [r.slide_id for r, c in zip(records, self.crops, strict=True) if fit == "mpp" and max(c.shape[:2]) > input_px]
        if shrunk:
            log.warning("%d slide(s) have tissue larger than %d px at %g µm/px and are shrunk to fit (e.g. %s)",
                        len(shrunk), input_px, thumb_mpp, shrunk[0])

    def _crop(self, r: ThumbRecord, thumb_mpp: float, margin_um: float) -> np.ndarray:
        img = cv2.imread(r.thumb_path, cv2.IMREAD_COLOR)
        if img is None:
            raise Her2labError(f"{r.thumb_path}: thumbnail missing or unreadable; re-run the prepare step")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        mask, mask_mpp = read_tissue_mask(r.tiles_path)  # read once: the box and the glass come from it
        if self.mask_background:  # glass, pen, dust and edges become plain glass: nothing to learn there
            m = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
            # near-black (and its blended rim): slide edges, not tissue
            dark = cv2.dilate((img.max(-1) < DARK).astype(np.uint8), np.ones((5, 5), np.uint8))
            img[(m == 0) | (dark > 0)] = BACKGROUND
        x0, y0, x1, y1 = mask_box(mask, mask_mpp, r.tiles_path, thumb_mpp, img.shape[:2], margin_um)
        if max(x1 - x0, y1 - y0) < MIN_TISSUE_PX:
            raise Her2labError(
                f"{r.slide_id}: its tissue spans only {max(x1 - x0, y1 - y0)} px at {thumb_mpp:g} µm/px; "
                "use a finer data.thumb_mpp"
            )
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def base_scale(self, i: int) -> float:
        h, w = self.crops[i].shape[:2]
        return 1.0 if self.fit == "mpp" else self.input_px / max(h, w)

    def image(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The (augmented, with ``rng``) square uint8 input image of item ``i``."""
        img, scale = self.crops[i], self.base_scale(i)
        if rng is not None:
            if self.hed_sigma > 0:
                img = hed_jitter(img, rng, self.hed_sigma)
            scale *= rng.uniform(1 - self.scale_jitter, 1 + self.scale_jitter)
        return fit_square(img, self.input_px, scale)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i)) if self.train else None
        x = torch.from_numpy(self.image(i, rng)).permute(2, 0, 1).float() / 255.0
        if rng is not None:
            x = dihedral(x, int(rng.integers(4)), bool(rng.random() < 0.5))
        x = (x - self.mean) / self.std
        return x.contiguous(), self.records[i].label, i


class ThumbnailDataModule(SlideLoaders, pl.LightningDataModule):
    def __init__(
        self,
        splits: dict[str, list[ThumbRecord]],
        thumb_mpp: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_px: int = 256,
        fit: str = "mpp",
        margin_um: float = 100.0,
        hed_sigma: float = 0.05,
        scale_jitter: float = 0.1,
        mask_background: bool = True,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        balanced_sampler: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.kw = dict(thumb_mpp=thumb_mpp, input_px=input_px, fit=fit, margin_um=margin_um, mean=tuple(mean),
                       std=tuple(std), hed_sigma=hed_sigma, scale_jitter=scale_jitter, seed=seed,
                       mask_background=mask_background)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.balanced_sampler, self.num_workers, self.seed = balanced_sampler, num_workers, seed
        self.datasets: dict[str, ThumbnailDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for name, recs in self.splits.items():
            if recs and name not in self.datasets:
                self.datasets[name] = ThumbnailDataset(recs, train=name == "train", **self.kw)
