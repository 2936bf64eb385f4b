"""``python -m her2lab.extract cohort=demo backbone=hne`` (or ``her2lab extract``): embed every
tile with a frozen encoder."""

from her2lab.cli import run_task


def main() -> None:
    run_task("extract")


if __name__ == "__main__":
    main()
