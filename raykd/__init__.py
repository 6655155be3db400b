"""raykd's Python API: the same stages as the `raykd` command, returning records instead of printing tables.

    import raykd

    cfg = raykd.load_config("configs/demo.yaml", ["distill.optim.epochs=4"])  # YAML <- overrides
    raykd.teachers(cfg)                      # -> list of teacher records (teacher.json)
    raykd.cache(cfg)                         # -> the cache manifest (manifest.json)
    student = raykd.distill(cfg)             # -> the student record (student.json)
    runs = raykd.compare(cfg)                # -> records of every run.compare entry (as `raykd run`)
    summary = raykd.sweep(cfg)               # -> the sweep summary (sweep.json)
    table = raykd.open_cache(cfg).read_table(views=[0])   # a view as a pyarrow Table (.to_pandas())
    model = raykd.load_student(cfg, student["name"])      # the trained student, an nn.Module in eval mode

Progress goes to the `raykd` logger (`raykd.pipeline.core.log`): `logging.getLogger("raykd").setLevel(logging.WARNING)`
silences it. Errors in input raise `raykd.RaykdError` (ConfigError, CacheError, CheckpointError, ...).
`raykd.with_changes(cfg, {"method.name": "dkd"})` is a validated copy with dotted changes.
"""

from __future__ import annotations

import os as _os

# `raykd.pipeline` and `raykd.methods` are the repository's top-level `pipeline/` and `methods/` folders:
# the wheel maps them there (pyproject.toml, package-dir); a source checkout finds them beside this folder.
_here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_here, "pipeline", "__init__.py")) and _here not in __path__:
    __path__.append(_here)

from raykd.pipeline.cli import _version  # noqa: E402
from raykd.pipeline.core.config import Config, load_config  # noqa: E402
from raykd.pipeline.core.config import variant as _variant  # noqa: E402
from raykd.pipeline.core.errors import RaykdError  # noqa: E402

__all__ = ["Config", "RaykdError", "load_config", "with_changes", "teachers", "cache", "professor", "distill",
           "compare", "sweep", "open_cache", "load_student", "__version__"]


__version__ = _version()


def with_changes(cfg: Config, changes: dict) -> Config:
    """`cfg` with `{dotted.key: value}` changes, validated like a YAML (errors name the key)."""
    return _variant(cfg, changes, "raykd.with_changes")


def teachers(cfg: Config) -> list[dict]:
    """Train (or reuse, or evaluate given checkpoints of) every configured teacher; their records."""
    from raykd.pipeline.stages.teachers import run_teachers

    return run_teachers(cfg)


def cache(cfg: Config, overwrite: bool = False, repair: bool = False) -> dict:
    """Build (or reuse, or finish, or repair) the teacher cache; its manifest."""
    from raykd.pipeline.cache import build_cache

    return build_cache(cfg, overwrite=overwrite, repair=repair)


def professor(cfg: Config) -> dict:
    """Train (or reuse) the professor and add the cache's refined column; its manifest entry."""
    from raykd.pipeline.stages.professor import run_professor

    return run_professor(cfg)


def distill(cfg: Config) -> dict:
    """Distil one student as configured (or reuse a finished one of the same fingerprint); its record."""
    from raykd.pipeline.stages.students import run_distill

    return run_distill(cfg)


def compare(cfg: Config, parallel: int | None = None) -> list[dict]:
    """`raykd run` without the printing: teachers, cache, the professor when a run needs it, then one
    student per `run.compare` entry (or the configured one), `parallel` at a time, training while the
    cache is built; their records."""
    from raykd.pipeline.stages.chain import run_all

    return run_all(cfg, parallel)


def sweep(cfg: Config) -> dict:
    """Run (or resume) `sweep.space` over the cache; the summary (rows sorted by the metric)."""
    from raykd.pipeline.stages.sweep import run_sweep

    return run_sweep(cfg)


def open_cache(where, s3_endpoint: str | None = None):
    """A finished cache, checked (`raykd.pipeline.cache.Cache`): `.manifest`, `.read_table(columns, views)` (pyarrow,
    no Ray), `.view_files(k)`. `where` is a config (its cache.uri) or a path / s3:// URI."""
    from raykd.pipeline.cache import Cache, cache_uri

    if isinstance(where, Config):
        return Cache(cache_uri(where), s3_endpoint or where.cache.s3_endpoint)
    return Cache(where, s3_endpoint)


def load_student(cfg: Config, name: str):
    """The finished student `name` of this config's out_dir as an `nn.Module` in eval mode (its weights
    checked against their sha256). Its input is the data set's normalised images (see `raykd export`
    for a model that takes pixels)."""
    from raykd.pipeline.stages.export import load_student as _load

    return _load(cfg, name)[0]
