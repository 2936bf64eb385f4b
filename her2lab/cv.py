"""``python -m her2lab.cv <sweep dir>``: cross-validation summary (see her2lab/eval/cv.py)."""

from her2lab.eval.cv import main

if __name__ == "__main__":
    main()
