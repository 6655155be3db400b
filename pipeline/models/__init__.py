"""raykd's models layer: the model zoo, model sources, checkpoints, plugins."""
