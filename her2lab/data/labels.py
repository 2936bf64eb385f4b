"""Label schemes: manifest HER2 score (+ ISH) → class index.

- ``her2_4way``: 0 / 1+ / 2+ / 3+ (the H&E-HER2 study).
- ``her2_3way``: HER2-0 / HER2-low (1+, or 2+ with negative ISH) / HER2-high (3+, or 2+ with
  positive ISH) — the IHC study's 0 / Low / High.
- ``binary``: {0, 1+} → negative, {2+, 3+} → positive (the study code's binary variant).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from her2lab.errors import ManifestError


@dataclass(frozen=True)
class LabelScheme:
    name: str
    classes: tuple[str, ...]

    def encode(self, manifest: pd.DataFrame) -> pd.Series:
        """Class index per row; raises naming the slides a scheme cannot label."""
        if self.name == "her2_4way":
            idx = manifest["her2_score"].map({"0": 0, "1+": 1, "2+": 2, "3+": 3})
        elif self.name == "binary":
            idx = manifest["her2_score"].map({"0": 0, "1+": 0, "2+": 1, "3+": 1})
        elif self.name == "her2_3way":
            score, ish = manifest["her2_score"], manifest.get("ish", pd.Series("", index=manifest.index))
            idx = score.map({"0": 0, "1+": 1, "3+": 2})
            two = score == "2+"
            idx[two & (ish == "neg")] = 1
            idx[two & (ish == "pos")] = 2
            missing = manifest.slide_id[two & ~ish.isin(["pos", "neg"])]
            if len(missing):
                raise ManifestError(
                    f"labels=her2_3way: 2+ slide(s) {', '.join(missing[:5])} have no ISH result; "
                    "add ish=pos/neg to the manifest or drop them"
                )
        else:
            raise ManifestError(f"labels.name={self.name!r}: use her2_4way, her2_3way or binary")
        return idx.astype(int)


def label_scheme(name: str, classes: list[str] | tuple[str, ...] | None = None) -> LabelScheme:
    default = {
        "her2_4way": ("0", "1+", "2+", "3+"),
        "her2_3way": ("0", "low", "high"),
        "binary": ("negative", "positive"),
    }
    if name not in default:
        raise ManifestError(f"labels.name={name!r}: use her2_4way, her2_3way or binary")
    return LabelScheme(name, tuple(classes) if classes else default[name])
