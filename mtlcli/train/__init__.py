"""Training loop, metrics, checkpoints and run directories."""
