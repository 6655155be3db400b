"""The teacher cache: K views of every training sample with each teacher's targets, as Parquet.

Layout (schema version 2) under a local path or any fsspec URL (s3://bucket/prefix):

    views/view=k/*.parquet     the teachers' rows of view k (a Hive partition: one epoch of a student)
    refined/view=k/*.parquet   the professor's refined targets of view k, keyed by (sample_id, view_id)
    _views/view=k.json         view k's commit record: its files, rows, bytes, sha256
    config.resolved.yaml       the resolved config of the build
    _build.lock, _build.json   while building: the lock's owner and heartbeat; the unfinished build
    manifest.json              written last, the commit marker: no manifest, no cache

Modules: `columns` (the one naming scheme), `codecs` (fp16 logits, int8 maps, top-k), `storage`
(filesystems, atomic JSON, the build lock), `build` (`raykd cache`), `reader` (`Cache`), `inspect`.
"""

from raykd.pipeline.cache import columns  # noqa: F401
from raykd.pipeline.cache.build import build_cache, cache_fingerprint, cache_uri  # noqa: F401
from raykd.pipeline.cache.codecs import dequantize_int8, quantize_int8, topk_decode, topk_encode  # noqa: F401
from raykd.pipeline.cache.inspect import inspect_cache  # noqa: F401
from raykd.pipeline.cache.passes import split_to_ray  # noqa: F401
from raykd.pipeline.cache.reader import Cache, PartChecks, TargetReader, column_array, load_refined, tensor_shape  # noqa: F401
from raykd.pipeline.cache.storage import (  # noqa: F401
                                        MANIFEST,
                                        REFINED,
                                        SCHEMA_VERSION,
                                        VIEWS,
                                        BuildLock,
                                        CacheDamage,
                                        CacheError,
                                        describe_files,
                                        open_fs,
                                        owner_alive,
                                        view_dir,
                                        write_json,
)
