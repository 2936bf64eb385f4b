"""Bags of tile embeddings for MIL: one bag per slide, read from feature h5 files.

Reads her2lab's features files and TRIDENT/CLAM-style ones alike (datasets ``features`` (N, D)
and ``coords`` (N, 2)). Training draws a random sub-bag of ``bag_size`` tiles per slide each
time a slide is visited (the H&E-HER2 study used 100); validation and test use every tile, so
each slide gets exactly one prediction. Bags of different sizes are padded into a batch with a
mask (True = real tile).

Features are kept in the file's dtype (float16 files stay at 2 bytes a value; the nets cast
chunk by chunk), so a cached bag costs what its file does, and a lone bag (the evaluation batch
of one) goes to the model as a view, not a copy.

Non-finite values (NaN/Inf: a broken tile, a float16 overflow in the encoder) are checked once
per file, when it is read. ``nonfinite="error"`` (the default, ``data.nonfinite``) refuses the
file with a message naming it and its bad rows; ``"drop_tiles"`` leaves those tiles out, logs a
warning and lists them (:attr:`BagDataModule.excluded_tiles`, written as ``excluded_tiles.csv``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from her2lab.embed.features_file import NONFINITE, load_bag
from her2lab.errors import Her2labError
from her2lab.io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class BagRecord:
    slide_id: str
    features_path: str
    label: int


class BagDataset(Dataset):
    """item → (features (n, D) tensor in the file's dtype, label, index).

    ``in_memory``: every file is read (and checked) once, here; otherwise at each visit.
    ``excluded_tiles``: slide id → (tiles in the file, tiles left out), for ``drop_tiles``.
    """

    def __init__(
        self, records: list[BagRecord], bag_size: int | None, train: bool, in_memory: bool, dim: int | None, seed: int,
        nonfinite: str = "error",
    ) -> None:
        self.records, self.bag_size, self.train, self.dim, self.seed = records, bag_size, train, dim, seed
        self.nonfinite = nonfinite
        self.excluded_tiles: dict[str, tuple[int, int]] = {}
        self.cache = [self._read(i) for i in range(len(records))] if in_memory else None
        self.epoch = 0  # set by BagSampler.set_epoch: sub-bags depend on (seed, slide, epoch) only

    def _read(self, i: int) -> np.ndarray:
        feats, _, dropped = load_bag(self.records[i].features_path, self.dim, self.nonfinite)
        if dropped:
            self.excluded_tiles[self.records[i].slide_id] = (len(feats) + dropped, dropped)
        return feats

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        feats = self.cache[i] if self.cache is not None else self._read(i)
        if self.train and self.bag_size and len(feats) > self.bag_size:
            rng = np.random.default_rng((self.seed, i, self.epoch))
            feats = feats[np.sort(rng.choice(len(feats), self.bag_size, replace=False))]
        return torch.from_numpy(feats), self.records[i].label, i


def pad_bags(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """List of (n_i, D) bags → features (B, N, D), mask (B, N), labels (B,), indices (B,).

    The features keep the bags' dtype (the model casts); a batch of one bag is a view of it.
    """
    labels, indices = torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])
    if len(batch) == 1:  # the evaluation batch: no padding, so no copy of a possibly huge bag
        f = batch[0][0]
        return f[None], torch.ones(1, len(f), dtype=torch.bool), labels, indices
    n = max(len(b[0]) for b in batch)
    d = batch[0][0].shape[1]
    dtype = batch[0][0].dtype
    for b in batch[1:]:
        dtype = torch.promote_types(dtype, b[0].dtype)
    x = torch.zeros(len(batch), n, d, dtype=dtype)
    mask = torch.zeros(len(batch), n, dtype=torch.bool)
    for i, (f, _, _) in enumerate(batch):
        x[i, : len(f)] = f
        mask[i, : len(f)] = True
    return x, mask, labels, indices


class BagSampler(DistributedSampler):
    """Deterministic per-epoch order of slides, sharded over ranks.

    Training: a permutation (or, ``balanced``, a class-balanced draw with replacement) that
    depends only on ``(seed, epoch)``, so a run resumed from a checkpoint sees the same bags as
    one that never stopped; each rank takes every ``world``-th item. Evaluation (``shuffle=False``):
    each item exactly once over all ranks (no padding duplicates, which would bias the metrics).
    A ``DistributedSampler`` so that Lightning keeps it under DDP.
    """

    def __init__(self, dataset: BagDataset, shuffle: bool, balanced: bool = False, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.balanced = balanced
        n = len(dataset)
        self.num_samples = (n - rank + world - 1) // world if not shuffle else -(-n // world)
        self.total_size = self.num_samples * world

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch

    def __iter__(self):
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(self.rank, n, self.num_replicas))
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.balanced:
            labels = np.array([r.label for r in self.dataset.records])
            p = 1.0 / np.bincount(labels)[labels]
            order = rng.choice(n, self.total_size, replace=True, p=p / p.sum())
        else:
            order = rng.permutation(n)
            order = np.concatenate([order, order[: self.total_size - n]])  # even shares for DDP
        return iter(order[self.rank :: self.num_replicas].tolist())


class SlideLoaders:
    """Data loaders of a datamodule with one item per slide (``self.datasets`` by split):
    :class:`BagSampler` order, sharded over the trainer's ranks. ``collate_fn`` says how items
    make a batch (``None``: PyTorch's default)."""

    collate_fn = None

    def _ranks(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        rank, world = self._ranks()
        sampler = BagSampler(ds, shuffle=True, balanced=self.balanced_sampler, seed=self.seed, rank=rank, world=world)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_fn, num_workers=self.num_workers)

    def _eval(self, name: str) -> DataLoader:
        rank, world = self._ranks()
        sampler = BagSampler(self.datasets[name], shuffle=False, rank=rank, world=world)
        return DataLoader(self.datasets[name], batch_size=self.eval_batch_size, sampler=sampler,
                          collate_fn=self.collate_fn, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test" if "test" in self.datasets else "val")


class BagDataModule(SlideLoaders, pl.LightningDataModule):
    collate_fn = staticmethod(pad_bags)

    def __init__(
        self,
        splits: dict[str, list[BagRecord]],
        embed_dim: int | None = None,
        bag_size: int | None = 100,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        balanced_sampler: bool = False,
        in_memory: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        nonfinite: str = "error",
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE:
            raise Her2labError(f"data.nonfinite={nonfinite!r}: use {' or '.join(NONFINITE)}")
        self.nonfinite = nonfinite
        self.splits = splits
        self.embed_dim, self.bag_size = embed_dim, bag_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.balanced_sampler, self.in_memory = balanced_sampler, in_memory
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, BagDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for name, recs in self.splits.items():
            if recs and name not in self.datasets:
                train = name == "train"
                self.datasets[name] = BagDataset(
                    recs, self.bag_size if train else None, train, self.in_memory, self.embed_dim, self.seed, self.nonfinite
                )

    @property
    def excluded_tiles(self) -> pd.DataFrame:
        """Tiles left out for non-finite features (``data.nonfinite=drop_tiles``), one row per
        slide: ``slide_id, tiles, dropped, reason`` (empty when none were)."""
        rows = [{"slide_id": sid, "tiles": n, "dropped": k, "reason": "non-finite features"}
                for ds in self.datasets.values() for sid, (n, k) in ds.excluded_tiles.items()]
        return pd.DataFrame(rows, columns=["slide_id", "tiles", "dropped", "reason"]).sort_values("slide_id", ignore_index=True)


def write_excluded_tiles(dm, path: Path) -> None:
    """``excluded_tiles.csv`` when a datamodule left tiles out (nothing is written otherwise)."""
    table = getattr(dm, "excluded_tiles", None)
    if table is not None and len(table):

        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
