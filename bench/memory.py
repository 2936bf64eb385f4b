"""Peak memory of scoring one huge bag: what a test slide of ``--n`` tiles costs above its file.

Writes one features file per dtype (``--n`` × ``--dim``, float16 and float32, TRIDENT layout:
``features`` and ``coords`` only), then, in a fresh subprocess each (so that one's peak cannot
hide the other's), runs the test-time path on it:

- ``her2lab``: the real ``BagDataModule`` (bag cached in the file's dtype, the lone test bag
  handed over as a view) and ``MILModule.test_step`` (gated ABMIL, ``--chunk`` tiles cast and
  projected at a time);
- ``old-style`` (the baseline, kept here for comparison only): what the code did before — the
  cache cast to float32, the bag copied into a float32 padded batch, one forward over all N
  tiles at once.

Each child reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its baseline after
imports and model creation; the table gives that "peak RSS added" and its ratio to the file
size (target: ≤ 2×), and checks that both paths give the same class probabilities.

    python bench/memory.py [--n 150000] [--dim 512] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import h5py
import numpy as np

MB = 1e6


def make_file(path: Path, n: int, dim: int, dtype: str, seed: int = 0) -> int:
    """A features file written by hand (no her2lab attributes); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", (n, dim), dtype=dtype)
        for s in range(0, n, 20000):  # in slices: the generator itself stays small
            ds[s : s + 20000] = rng.standard_normal((min(20000, n - s), dim)).astype(dtype)
        f.create_dataset("coords", data=np.stack([np.arange(n) % 1000, np.arange(n) // 1000], 1).astype(np.int64) * 256)
    return path.stat().st_size


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def child(path: str, mode: str, chunk: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from her2lab.data.bags import BagDataModule, BagRecord
    from her2lab.embed.features_file import read_features
    from her2lab.lit.mil_module import MILModule
    from her2lab.models.abmil import AttentionMIL

    torch.set_num_threads(2)
    with h5py.File(path, "r") as f:
        dim = f["features"].shape[1]
    torch.manual_seed(0)
    module = MILModule(AttentionMIL(dim, 4, dropout=0.0), 4, optimizer=partial(torch.optim.Adam), chunk=chunk).eval()
    with torch.no_grad():  # warm-up on a tiny bag (library set-up is not the bag's cost; too small to hide any)
        module.net(torch.zeros(1, 128, dim, dtype=torch.float16), chunk=64)
        module.net(torch.zeros(1, 64, dim))
    base = _peak_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "her2lab":
            dm = BagDataModule({"test": [BagRecord("big", path, 0)]}, embed_dim=dim)
            dm.setup("test")
            batch = next(iter(dm.test_dataloader()))
            module.test_step(batch, 0)  # the real test step: forward, checks, metrics, kept prediction
            probs = module.test_outputs[0]["probs"]
        else:  # old-style: float32 cache, float32 padded copy, whole-bag forward
            feats = read_features(path, dim)[0].astype(np.float32)  # (N, D) the old cache
            x = torch.zeros(1, len(feats), dim)  # (1, N, D) the old pad_bags' batch
            x[0] = torch.from_numpy(feats)
            mask = torch.ones(1, len(feats), dtype=torch.bool)
            logits, _ = module.net(x, mask)  # no chunk: every tile's activations at once
            probs = module.probs(logits)[0].tolist()
    return {"added_mb": _peak_mb() - base, "base_mb": base, "seconds": time.perf_counter() - t0, "probs": probs}


def run_child(path: Path, mode: str, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--mode", mode, "--chunk", str(chunk)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} on {path.name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=150_000, help="tiles in the bag")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8192, help="tiles projected at a time (her2lab's path)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="her2lab", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.chunk)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "float32"):
            path = Path(tmp) / f"big_{dtype}.h5"
            size = make_file(path, args.n, args.dim, dtype)
            new, old = run_child(path, "her2lab", args.chunk), run_child(path, "old-style", args.chunk)
            diff = float(np.abs(np.array(new["probs"]) - np.array(old["probs"])).max())
            rows.append((dtype, size / MB, new, old, diff))
            path.unlink()
    print(f"one bag of {args.n:,} × {args.dim} (chunk {args.chunk}); peak RSS added by reading + scoring it")
    print("| measurement | her2lab | baseline (old-style) | ratio |")
    print("|---|---:|---:|---:|")
    for dtype, size, new, old, diff in rows:
        print(f"| {dtype} file ({size:.0f} MB): peak RSS added, MB | {new['added_mb']:.0f} | {old['added_mb']:.0f} | "
              f"{new['added_mb'] / old['added_mb']:.2f}× |")
        print(f"| {dtype}: peak RSS added / file size | {new['added_mb'] / size:.2f}× | {old['added_mb'] / size:.2f}× | — |")
        print(f"| {dtype}: read + test forward, s | {new['seconds']:.2f} | {old['seconds']:.2f} | "
              f"{new['seconds'] / old['seconds']:.2f}× |")
        print(f"| {dtype}: max abs difference of the class probabilities | {diff:.1e} | — | — |")


if __name__ == "__main__":
    main()
