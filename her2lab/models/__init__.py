"""Plain nn.Modules (no training logic): MIL nets (one base class and a registry), heads, image classifiers."""

# the built-in MIL nets register themselves on import, so the registry is full whenever the package is
from her2lab.models import abmil, pooling  # noqa: F401
