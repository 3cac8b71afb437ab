"""Training: optimizer, loss, jitted steps, loop, checkpoints."""
