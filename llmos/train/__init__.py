"""Training: token data, the one training loop, checkpoints."""
