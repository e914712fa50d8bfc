"""Training: the accelerate loop, EMA, checkpoints, datasets."""
