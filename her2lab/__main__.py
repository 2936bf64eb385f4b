"""``python -m her2lab <command> …``: the same as the ``her2lab`` console command."""

from her2lab.cli import main

if __name__ == "__main__":
    main()
