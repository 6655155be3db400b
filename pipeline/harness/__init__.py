"""raykd's harness layer: the training loop and where a job runs (Ray)."""
