"""raykd's data layer: data sets, views, batches, shard sources."""
