"""``python -m her2lab.prepare cohort=demo`` (or ``her2lab prepare``): tissue masks, tile grids,
thumbnails and QC for a cohort."""

from her2lab.cli import run_task


def main() -> None:
    run_task("prepare")


if __name__ == "__main__":
    main()
