"""Plain nn.Modules (no training logic): MIL nets (one base class and a registry), heads, image classifiers."""
