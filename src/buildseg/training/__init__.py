"""Training: the loop, checkpoints, hardware/precision choices, torchrun integration."""
