"""What spreads a job over processes or a cluster: the local runner (one process or
torchrun's ranks) and Ray."""
