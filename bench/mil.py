"""MIL training throughput: padded batches of bags vs one bag per step, in-memory vs h5 reads.

Writes ``--slides`` feature files like the demo's (N tiles × 512-d float16, N drawn around
``--tiles``), then times training epochs (forward, backward, Adam step) of gated ABMIL over the
same BagDataModule in three set-ups, interleaved round by round so machine noise hits all alike:

- ``padded8_mem``: 8 bags a step, padded + masked, features cached in memory (the default);
- ``one_mem``: 1 bag a step (what a loop without padding must do), cached;
- ``padded8_h5``: 8 bags a step, every bag read from its h5 file each time.

    python bench/mil.py [--slides 200] [--tiles 2000] [--bag-size 0] [--rounds 3]

``--bag-size 0`` trains on whole bags (sub-bags of 100 make every variant cheap).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from her2lab.data.bags import BagDataModule, BagRecord
from her2lab.io import write_h5
from her2lab.models.abmil import AttentionMIL


def make_features(folder: Path, slides: int, tiles: int, dim: int, seed: int = 0) -> list[BagRecord]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(slides):
        n = int(rng.integers(tiles // 2, tiles * 3 // 2))
        path = folder / f"s{i:04d}.h5"
        write_h5(path, {"features": rng.standard_normal((n, dim)).astype(np.float16),
                        "coords": rng.integers(0, 10**5, (n, 2))}, {})
        recs.append(BagRecord(f"s{i:04d}", str(path), int(rng.integers(4))))
    return recs


def epoch_seconds(recs: list[BagRecord], batch_size: int, in_memory: bool, bag_size: int | None, dim: int) -> float:
    dm = BagDataModule({"train": recs}, embed_dim=dim, bag_size=bag_size, batch_size=batch_size, in_memory=in_memory)
    dm.setup()  # (in-memory: the one-off read happens here, outside the timed epoch)
    torch.manual_seed(0)
    net = AttentionMIL(dim, 4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    for x, mask, y, _ in loader:
        loss = torch.nn.functional.cross_entropy(net(x, mask)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--bag-size", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    bag = a.bag_size or None
    variants = {"padded8_mem": (8, True), "one_mem": (1, True), "padded8_h5": (8, False)}
    with tempfile.TemporaryDirectory() as tmp:
        recs = make_features(Path(tmp), a.slides, a.tiles, a.dim)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(a.rounds):
            for k, (bs, mem) in variants.items():
                times[k].append(epoch_seconds(recs, bs, mem, bag, a.dim))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {a.slides} slides, ~{a.tiles} tiles × {a.dim}-d, "
          f"bag_size={bag}, median of {a.rounds} epochs")
    base = statistics.median(times["padded8_mem"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:12s} {med:7.2f} s/epoch  {a.slides / med:8.1f} slides/s  speed vs padded8_mem: {base / med:5.2f}×")


if __name__ == "__main__":
    main()
