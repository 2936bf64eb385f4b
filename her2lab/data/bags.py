"""Bags of tile embeddings for MIL: one bag per slide, read from feature h5 files.

Reads her2lab's features files and TRIDENT/CLAM-style ones alike (datasets ``features`` (N, D)
and ``coords`` (N, 2)). Training draws a random sub-bag of ``bag_size`` tiles per slide each
time a slide is visited (the H&E-HER2 study used 100); validation and test use every tile, so
each slide gets exactly one prediction. Bags of different sizes are padded into a batch with a
mask (True = real tile).

What a training epoch is, is the ``sampler`` (:data:`SAMPLERS`): ``one_pass`` (the default) visits
every training slide once, in a new order each epoch; ``with_replacement`` is the H&E-HER2
study's epoch — ``iterations`` batches of ``batch_size`` bags, each bag from a slide drawn
uniformly at random with replacement (100 × 64 = 6,400 bag draws in the study), a new sub-bag at
every draw, even of a slide drawn twice.

``test_bags`` (``eval.bag_sampling``, the H&E-HER2 study's evaluation unit) scores each test
slide as the mean of ``n_bags`` random bags of ``bag_size`` of its tiles instead of once from
every tile: the test loader then gives, per slide, its tiles and an index of the bags
(:class:`SampledBags`), and the model averages the bags' class probabilities.

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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from her2lab.embed.features_file import NONFINITE, load_bag, load_bag_views
from her2lab.errors import Her2labError
from her2lab.io import atomic_path

log = logging.getLogger(__name__)


#: Tags the random stream of the per-epoch view choice (sub-bag draws use small numbers there).
VIEW_STREAM = 2**32 - 1


@dataclass
class BagRecord:
    slide_id: str
    features_path: str
    label: int


class BagDataset(Dataset):
    """item → (features (n, D) tensor in the file's dtype, label, index).

    ``in_memory``: every file is read (and checked) once, here; otherwise at each visit.
    ``excluded_tiles``: slide id → (tiles in the file, tiles left out), for ``drop_tiles``.
    Training on files with augmented views (``extract.augment_views=K``): each tile's features
    are one of its K views, drawn per tile and per epoch (the same view wherever the tile is
    drawn in that epoch, a new draw the next); evaluation reads the plain features.
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
        """Slide ``i``'s features (N, D), or at training its augmented views (K, N, D) when the
        file has them."""
        if self.train:
            feats, views, dropped = load_bag_views(self.records[i].features_path, self.dim, self.nonfinite)
        else:
            (feats, _, dropped), views = load_bag(self.records[i].features_path, self.dim, self.nonfinite), None
        if dropped:
            self.excluded_tiles[self.records[i].slide_id] = (len(feats) + dropped, dropped)
        return feats if views is None else views

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]):
        # an int (one pass) or (slide, draw number) (with-replacement epochs: each draw its own sub-bag)
        i, draw = (item, None) if isinstance(item, int) else (int(item[0]), int(item[1]))
        feats = self.cache[i] if self.cache is not None else self._read(i)
        views = feats if feats.ndim == 3 else None  # (K, N, D): augmented views, training only
        n = feats.shape[-2]
        tiles = None
        if self.train and self.bag_size and n > self.bag_size:
            key = (self.seed, i, self.epoch) if draw is None else (self.seed, i, self.epoch, draw)
            rng = np.random.default_rng(key)
            tiles = np.sort(rng.choice(n, self.bag_size, replace=False))
        if views is not None:  # one view per tile and epoch, whichever draw of the slide this is
            view = np.random.default_rng((self.seed, i, self.epoch, VIEW_STREAM)).integers(len(views), size=n)
            tiles = np.arange(n) if tiles is None else tiles
            feats = views[view[tiles], tiles]
        elif tiles is not None:
            feats = feats[tiles]
        return torch.from_numpy(feats), self.records[i].label, i


class SampledBags(Dataset):
    """A bag dataset's slides, each with ``n_bags`` random bags of ``bag_size`` of its tiles:
    item → (features (N, D), label, index, bags (n_bags, k) tile indices), ``k = min(bag_size, N)``.

    A bag's tiles are drawn without replacement (the study's ``np.random.choice(…, replace=False)``);
    the bags of a slide depend only on ``seed`` and its slide id, not on which slides are tested
    with it or in what order.
    """

    def __init__(self, dataset: BagDataset, n_bags: int, bag_size: int, seed: int) -> None:
        if int(n_bags) < 1 or int(bag_size) < 1:
            raise Her2labError(f"eval.bag_sampling: n_bags={n_bags}, bag_size={bag_size}; both must be ≥ 1")
        self.dataset, self.n_bags, self.bag_size, self.seed = dataset, int(n_bags), int(bag_size), int(seed)
        self.records = dataset.records
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def bags(self, i: int, n_tiles: int) -> np.ndarray:
        """(n_bags, k) tile indices of slide ``i``'s bags."""
        rng = np.random.default_rng((self.seed, zlib.crc32(self.records[i].slide_id.encode())))
        k = min(self.bag_size, n_tiles)
        return np.stack([np.sort(rng.choice(n_tiles, k, replace=False)) for _ in range(self.n_bags)])

    def __getitem__(self, i: int):
        feats, label, idx = self.dataset[i]
        return feats, label, idx, torch.from_numpy(self.bags(i, len(feats)))


def one_slide_bags(batch):
    """A batch of one :class:`SampledBags` item → features (1, N, D), mask (1, N), labels (1,),
    indices (1,), bags (1, n_bags, k)."""
    if len(batch) != 1:
        raise Her2labError("eval.bag_sampling scores one slide a batch (data.module.eval_batch_size is ignored)")
    f, label, i, bags = batch[0]
    return f[None], torch.ones(1, len(f), dtype=torch.bool), torch.tensor([label]), torch.tensor([i]), bags[None]


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


#: What a training epoch is (``data.module.sampler.kind``).
SAMPLERS = ("one_pass", "with_replacement")


class BagSampler(DistributedSampler):
    """Deterministic per-epoch order of slides, sharded over ranks.

    Training: a permutation (or, ``balanced``, a class-balanced draw with replacement) that
    depends only on ``(seed, epoch)``, so a run resumed from a checkpoint sees the same bags as
    one that never stopped; each rank takes every ``world``-th item. With ``draws`` (the
    with-replacement epoch), ``draws`` slides per rank drawn with replacement (uniformly, or
    class-balanced), each yielded as ``(slide, draw number)`` so that every draw gets its own
    sub-bag. Evaluation (``shuffle=False``): each item exactly once over all ranks (no padding
    duplicates, which would bias the metrics). A ``DistributedSampler`` so that Lightning keeps
    it under DDP.
    """

    def __init__(self, dataset: BagDataset, shuffle: bool, balanced: bool = False, seed: int = 0,
                 rank: int = 0, world: int = 1, draws: int | None = None) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.balanced = balanced
        self.draws = draws if shuffle else None
        n = len(dataset)
        self.num_samples = (n - rank + world - 1) // world if not shuffle else -(-n // world)
        if self.draws:
            self.num_samples = int(self.draws)
        self.total_size = self.num_samples * world

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch

    def __iter__(self):
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(self.rank, n, self.num_replicas))
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.draws:
            p = self._balanced_p() if self.balanced else None
            order = rng.choice(n, self.total_size, replace=True, p=p)
            return iter([(int(order[k]), k) for k in range(self.rank, self.total_size, self.num_replicas)])
        if self.balanced:
            order = rng.choice(n, self.total_size, replace=True, p=self._balanced_p())
        else:
            order = rng.permutation(n)
            order = np.concatenate([order, order[: self.total_size - n]])  # even shares for DDP
        return iter(order[self.rank :: self.num_replicas].tolist())

    def _balanced_p(self) -> np.ndarray:
        """Per-slide draw probability giving every class the same share."""
        labels = np.array([r.label for r in self.dataset.records])
        p = 1.0 / np.bincount(labels)[labels]
        return p / p.sum()


def parse_sampler(sampler: dict | None) -> tuple[str, int | None]:
    """``(kind, iterations)`` of a ``data.module.sampler`` config; a wrong one is a one-line error."""
    sampler = dict(sampler or {})
    kind = str(sampler.get("kind") or "one_pass")
    if kind not in SAMPLERS:
        raise Her2labError(f"data.module.sampler.kind={kind!r}: use {' or '.join(SAMPLERS)}")
    it = sampler.get("iterations")
    if kind == "with_replacement":
        if not isinstance(it, int) or isinstance(it, bool) or it < 1:
            raise Her2labError(f"data.module.sampler.iterations={it!r}: a with_replacement epoch needs a whole "
                               "number of batches ≥ 1 (the study: 100)")
        return kind, it
    return kind, None


class SlideLoaders:
    """Data loaders of a datamodule with one item per slide (``self.datasets`` by split):
    :class:`BagSampler` order, sharded over the trainer's ranks. ``collate_fn`` says how items
    make a batch (``None``: PyTorch's default)."""

    collate_fn = None
    sampler: dict | None = None  # data.module.sampler; None: one pass

    def draws_per_epoch(self) -> int | None:
        """Bags drawn per rank in a training epoch (``with_replacement``), or None (one pass)."""
        kind, iterations = parse_sampler(self.sampler)
        return iterations * self.batch_size if kind == "with_replacement" else None

    def _ranks(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        rank, world = self._ranks()
        sampler = BagSampler(ds, shuffle=True, balanced=self.balanced_sampler, seed=self.seed, rank=rank, world=world,
                             draws=self.draws_per_epoch())
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
        sampler: dict | None = None,
        test_bags: dict | None = None,
    ) -> None:
        super().__init__()
        self.sampler = dict(sampler) if sampler else None
        self.test_bags = dict(test_bags) if test_bags else None  # eval.bag_sampling (n_bags, bag_size, seed)
        parse_sampler(self.sampler)  # a wrong sampler fails before any data is read
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

    def test_dataloader(self) -> DataLoader:
        """The test slides (the validation ones when there are none); with ``test_bags``, each
        slide with its random bags (:class:`SampledBags`), one slide a batch."""
        if not self.test_bags:
            return super().test_dataloader()
        ds = self.datasets["test" if "test" in self.datasets else "val"]
        bags = SampledBags(ds, self.test_bags.get("n_bags", 1600), self.test_bags.get("bag_size", 100),
                           self.test_bags.get("seed", 123))
        rank, world = self._ranks()
        return DataLoader(bags, batch_size=1, sampler=BagSampler(bags, shuffle=False, rank=rank, world=world),
                          collate_fn=one_slide_bags, num_workers=self.num_workers)

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
