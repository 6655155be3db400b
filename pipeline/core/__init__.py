"""raykd's core layer: the config schema, errors, logging, records, registries."""
