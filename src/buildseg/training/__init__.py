"""Training: the loop, its setup and schedule, validation, signals and run logs."""
