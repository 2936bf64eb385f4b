"""Plain nn.Modules (no training logic): MIL heads and pooling baselines."""
