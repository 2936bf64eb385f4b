"""``python -m her2lab.compare <ref> <other> …`` (or ``her2lab compare``): experiments side by
side on the same slides (see :mod:`her2lab.eval.compare`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from her2lab.errors import one_line_errors


def main(argv: Sequence[str] | None = None) -> None:
    prog = "her2lab compare" if Path(sys.argv[0]).name == "her2lab" else "python -m her2lab.compare"
    ap = argparse.ArgumentParser(prog=prog, description="Compare experiments on the same slides: "
                                 "compare.md and compare.csv")
    ap.add_argument("folders", type=Path, nargs="+", help="run or sweep folders; the first is the reference")
    ap.add_argument("--out", type=Path, default=Path("."), help="where compare.md and compare.csv go")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the paired intervals")
    a = ap.parse_args(argv)

    @one_line_errors
    def run() -> None:
        from her2lab.eval.compare import compare, markdown
        from her2lab.io import atomic_path

        table = compare(a.folders, n_boot=a.n_boot)
        a.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(a.out / "compare.csv") as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(a.out / "compare.md") as tmp:
            tmp.write_text(markdown(table))
        print(markdown(table))

    run()


if __name__ == "__main__":
    main()
