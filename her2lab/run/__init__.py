"""Task functions behind the Hydra entry points (prepare, extract, train, evaluate)."""
