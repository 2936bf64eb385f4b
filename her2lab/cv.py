"""``python -m her2lab.cv <sweep dir>`` (or ``her2lab cv``): cross-validation summary (see
:mod:`her2lab.eval.cv`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from her2lab.errors import Her2labError, one_line_errors


def main(argv: Sequence[str] | None = None) -> None:
    prog = "her2lab cv" if Path(sys.argv[0]).name == "her2lab" else "python -m her2lab.cv"
    ap = argparse.ArgumentParser(prog=prog, description="Cross-validation summary of a sweep folder: "
                                 "cv_summary.csv and cv_summary.md in it")
    ap.add_argument("sweep_dir", type=Path, help="a multirun folder (0/, 1/, … one job per fold)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    a = ap.parse_args(argv)

    @one_line_errors
    def run() -> None:
        if not a.sweep_dir.is_dir():
            raise Her2labError(f"{a.sweep_dir}: not a folder")
        from her2lab.eval.cv import cv_summary, markdown  # heavy: only once the arguments are good

        table = cv_summary(a.sweep_dir, n_boot=a.n_boot)
        print(markdown(table))
        print(f"→ {a.sweep_dir / 'cv_summary.csv'}, {a.sweep_dir / 'cv_summary.md'}")

    run()


if __name__ == "__main__":
    main()
