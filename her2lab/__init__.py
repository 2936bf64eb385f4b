"""her2lab: HER2 scoring from whole-slide images.

Slides → tissue → tiles → frozen-encoder embeddings → attention-MIL, or slide thumbnails →
end-to-end ConvNeXt; every experiment is a Hydra config override.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config tree. It ships inside the package (so an installed wheel has it); ``conf/`` at
#: the top of a clone is a link to it, for ``python train.py`` and for reading.
CONF_DIR = Path(__file__).resolve().parent / "conf"
