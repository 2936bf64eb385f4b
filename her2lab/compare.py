"""``python -m her2lab.compare <ref> <other> …``: experiments side by side (see her2lab/eval/compare.py)."""

from her2lab.eval.compare import main

if __name__ == "__main__":
    main()
