"""her2lab: HER2 scoring from whole-slide images.

Slides → tissue → tiles → frozen-encoder embeddings → attention-MIL, or slide thumbnails →
end-to-end ConvNeXt; every experiment is a Hydra config override.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config tree (``conf/`` at the top of the repository).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
