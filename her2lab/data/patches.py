"""Tiles labelled with their slide's label, for patch classifiers (encoder pretraining).

``PatchDataModule`` reads tiles straight from the slides (the tiles files say where), samples
``tiles_per_slide`` random tiles per training slide each epoch (a fixed subset for validation
and test, so their metrics are comparable across epochs), and augments with flips, 90°
rotations and a modest colour jitter. ``PatchFolderDataModule`` trains on any folder of labelled
patches laid out as ``root/{train,val}/{class}/*.png``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from her2lab.errors import Her2labError
from her2lab.slides.tiles_file import load_slide_tiles
from her2lab.slides.tiling import ReaderPool


@dataclass
class SlideRecord:
    """A prepared slide: where its tiles are and its label."""

    slide_id: str
    slide_path: str
    tiles_path: str
    label: int
    mpp: float | None = None


def augment(x: torch.Tensor, rng: np.random.Generator, jitter: float) -> torch.Tensor:
    """Dihedral transform (flips, 90° rotations) and brightness/contrast/saturation jitter.

    ``x``: (3, H, W) in [0, 1]. Labels of whole-slide patches do not depend on orientation.
    """
    k = int(rng.integers(4))
    x = torch.rot90(x, k, dims=(1, 2))
    if rng.random() < 0.5:
        x = torch.flip(x, dims=(2,))
    if jitter > 0:
        b, c, s = (1 + rng.uniform(-jitter, jitter, 3)).tolist()
        grey = x.mean(0, keepdim=True)
        x = grey + (x - grey) * s  # saturation
        x = (x - x.mean()) * c + x.mean()  # contrast
        x = (x * b).clamp(0, 1)  # brightness
    return x


class SlidePatchDataset(Dataset):
    """(slide, tile) pairs → (normalised image (3, H, W), label, slide index)."""

    def __init__(
        self,
        slides: list[SlideRecord],
        tiles_per_slide: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        jitter: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.slides = slides
        self.tiles = [load_slide_tiles(s.tiles_path, s.slide_id, s.slide_path, s.mpp) for s in slides]
        self.tiles_per_slide = tiles_per_slide
        self.mean, self.std = mean, std
        self.train, self.jitter, self.seed = train, jitter, seed
        self.epoch = 0
        self.readers = ReaderPool()
        self.index = self._sample(seed)

    def _sample(self, seed: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng(seed)
        out = []
        for j, t in enumerate(self.tiles):
            n = len(t.coords)
            k = n if self.tiles_per_slide is None else min(n, self.tiles_per_slide)
            out += [(j, int(i)) for i in np.sort(rng.choice(n, size=k, replace=False))]
        return out

    def set_epoch(self, epoch: int) -> None:
        """Training draws new tiles each epoch (deterministic per epoch)."""
        self.epoch = epoch
        if self.train:
            self.index = self._sample(self.seed + 1000 * (epoch + 1))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j, k = self.index[i]
        t = self.tiles[j]
        tile = torch.from_numpy(self.readers.get(j, t.slide_path, t.mpp, t.geom).read(t.coords[k]).copy())
        x = tile.movedim(-1, 0).float() / 255.0  # (3, H, W) in [0, 1]
        if self.train:
            x = augment(x, np.random.default_rng((self.seed, self.epoch, i)), self.jitter)
        x = (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return x.contiguous(memory_format=torch.contiguous_format), self.slides[j].label, j

    @property
    def records(self) -> list[SlideRecord]:
        return self.slides


#: Random tiles per training slide whose pixels give a pretraining run its mean/std.
NORM_TILES_PER_SLIDE = 64


def channel_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels of ``images`` ((3, H, W) tensors in
    [0, 1]), accumulated in float64."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    n = 0
    for x in images:
        x = x.to(torch.float64).flatten(1)  # (3, H·W)
        total += x.sum(1)
        squares += (x * x).sum(1)
        n += x.shape[1]
    if n == 0:
        raise Her2labError("no tile to compute the normalisation from (empty training split?)")
    mean = total / n
    std = (squares / n - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def tile_stats(slides: list[SlideRecord], tiles_per_slide: int = NORM_TILES_PER_SLIDE,
               seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of ``tiles_per_slide`` random tiles (un-augmented, in [0, 1]) of each slide:
    the dataset-specific normalisation of an encoder pretrained on these slides' tiles."""
    ds = SlidePatchDataset(slides, tiles_per_slide, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), train=False, seed=seed)
    return channel_stats(ds[i][0] for i in range(len(ds)))


def folder_stats(root: str, input_px: int, max_images: int = 2048,
                 seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of up to ``max_images`` random images of a patch folder's ``train/``."""
    from pathlib import Path

    from torchvision import datasets, transforms

    folder = Path(root) / "train"
    if not folder.is_dir():
        raise Her2labError(f"{root}: a patch folder needs train/ and val/ sub-folders, one folder per class in each")
    ds = datasets.ImageFolder(folder, transforms.Compose([transforms.Resize((input_px, input_px)), transforms.ToTensor()]))
    pick = np.random.default_rng(seed).permutation(len(ds))[:max_images]
    return channel_stats(ds[int(i)][0] for i in pick)


class PatchDataModule(pl.LightningDataModule):
    """Slide-labelled tiles for train/val/test splits of a prepared cohort."""

    def __init__(
        self,
        splits: dict[str, list[SlideRecord]],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        tiles_per_slide: int = 32,
        eval_tiles_per_slide: int | None = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        jitter: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.kw = {"mean": tuple(mean), "std": tuple(std), "seed": seed}
        self.tiles_per_slide, self.eval_tiles_per_slide = tiles_per_slide, eval_tiles_per_slide
        self.batch_size, self.num_workers, self.jitter = batch_size, num_workers, jitter
        self.datasets: dict[str, SlidePatchDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for name, slides in self.splits.items():
            if slides and name not in self.datasets:
                train = name == "train"
                n = self.tiles_per_slide if train else self.eval_tiles_per_slide
                self.datasets[name] = SlidePatchDataset(slides, n, train=train, jitter=self.jitter, **self.kw)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[name]
        if shuffle and self.trainer is not None:
            ds.set_epoch(self.trainer.current_epoch)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def _eval(self, name: str) -> DataLoader:
        return self._loader(name, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", shuffle=False)


class PatchFolderDataModule(pl.LightningDataModule):
    """Any labelled patch folder: ``root/train/{class}/*`` and ``root/val/{class}/*`` (ImageFolder)."""

    def __init__(
        self, root: str, input_px: int, mean, std, num_classes: int, batch_size: int = 32, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.root, self.input_px = root, input_px
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str | None = None) -> None:
        from pathlib import Path

        from torchvision import datasets, transforms

        root = Path(self.root)
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise Her2labError(f"{root}: a patch folder needs train/ and val/ sub-folders, one folder per class in each")
        tf = [transforms.Resize((self.input_px, self.input_px)), transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        aug = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(), transforms.ColorJitter(0.1, 0.1, 0.1)]
        self.train_set = datasets.ImageFolder(root / "train", transforms.Compose(aug + tf))
        self.val_set = datasets.ImageFolder(root / "val", transforms.Compose(tf))
        if self.train_set.classes != self.val_set.classes:
            raise Her2labError(f"{root}: train classes {self.train_set.classes} differ from val classes {self.val_set.classes}")
        self.classes = self.train_set.classes
        if len(self.classes) != self.num_classes:
            raise Her2labError(
                f"{root}: {len(self.classes)} class folders {self.classes} but the labels have "
                f"{self.num_classes} classes; pick labels=… to match"
            )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
