"""Benchmark: start-up time of the command line (``--help`` of every command).

Each row is a fresh process, timed from launch to exit (wall clock), median over rounds; the
commands run in turn within each round (order rotating between rounds), so a busy machine slows
them alike. The reference row is what ``python train.py --help`` used to pay before Hydra could
parse: importing the training task eagerly (``import her2lab.run.train``, i.e. Lightning, torch,
timm). The ratio column is each command's time over that reference, per round, median; the CPU
column (user + system seconds of the process, median) is what the wall time comes to on an idle
machine.

Run: ``python bench/startup.py [--rounds 7]`` from the repository root (``her2lab`` on PATH, or
next to this Python).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _her2lab() -> str:
    here = Path(sys.executable).with_name("her2lab")
    return str(here) if here.exists() else (shutil.which("her2lab") or "her2lab")


def commands() -> dict[str, list[str]]:
    cli = _her2lab()
    py = sys.executable
    return {
        "import her2lab.run.train (reference)": [py, "-c", "import her2lab.run.train"],
        "her2lab --help": [cli, "--help"],
        "her2lab train --help": [cli, "train", "--help"],
        "python train.py --help": [py, str(REPO / "train.py"), "--help"],
        "her2lab eval --help": [cli, "eval", "--help"],
        "her2lab prepare --help": [cli, "prepare", "--help"],
        "her2lab extract --help": [cli, "extract", "--help"],
        "her2lab cv --help": [cli, "cv", "--help"],
        "her2lab compare --help": [cli, "compare", "--help"],
        "her2lab doctor --help": [cli, "doctor", "--help"],
    }


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``cmd``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    cmds = commands()
    names = list(cmds)
    for name in names:  # warm the file cache and the bytecode once
        timed(cmds[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            wall, used = timed(cmds[name])
            times[name].append(wall)
            cpu[name].append(used)
    ref = times[names[0]]
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'CPU s':>7} {'× reference':>12}")
    for name in names:
        ratio = statistics.median(t / r for t, r in zip(times[name], ref, strict=True))
        print(f"{name:<40} {statistics.median(times[name]):>9.2f} {min(times[name]):>7.2f} "
              f"{statistics.median(cpu[name]):>7.2f} {ratio:>12.2f}")
    print(f"{a.rounds} rounds; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
