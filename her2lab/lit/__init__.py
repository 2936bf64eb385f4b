"""LightningModules: they own loss, metrics and optimisers; networks are plain nn.Modules."""
