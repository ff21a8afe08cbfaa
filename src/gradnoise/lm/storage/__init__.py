"""A run's files: atomic writes, checked reads, checkpoints, run directories and the run log."""
