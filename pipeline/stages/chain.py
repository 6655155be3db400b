"""`raykd run`: the stages in order — teachers, cache, the professor when a run needs it, the students —
one chain for the command and the Python API (`raykd.compare`).

The students do not wait for the whole cache: the build runs in a thread of this process while they
train, each epoch starting once its view is committed (the cache's `Building` watch). A build that fails
ends the students waiting on it with its error, and that error is the one raised. The professor reads
every view, so a run that needs it builds the cache first.
"""

from __future__ import annotations

import threading

from raykd.pipeline.core.config import Config, variant
from raykd.pipeline.core.log import log


def compare_runs(cfg: Config) -> list[Config]:
    """The students of a run: one per `run.compare` entry, or the configured one."""
    return [variant(cfg, c, f"run.compare.{i}") for i, c in enumerate(cfg.run.compare)] or [cfg]


class BackgroundBuild:
    """`build_cache` in a thread; `started()` returns once the students can open the cache (its first
    view committed, or the build over), `join()` raises what the build raised."""

    def __init__(self, cfg: Config, overwrite: bool):
        from raykd.pipeline.cache import build_cache

        self.first_view = threading.Event()
        self.error: BaseException | None = None

        def build():
            try:
                build_cache(cfg, overwrite=overwrite, on_first_view=self.first_view.set)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            finally:
                self.first_view.set()

        # a daemon: an interrupted run exits without it; the lock and commit records make the rerun resume
        self.thread = threading.Thread(target=build, name="raykd-cache-build", daemon=True)
        self.thread.start()

    def started(self) -> None:
        self.first_view.wait()
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_all(cfg: Config, parallel: int | None = None, overwrite: bool = False, on_teachers=None) -> list[dict]:
    """Every stage of `raykd run`; the students' records. `on_teachers(records)` sees the teachers' records
    before the cache starts (the command prints their table)."""
    from raykd.pipeline.stages.students import run_students
    from raykd.pipeline.stages.teachers import run_teachers

    records = run_teachers(cfg)
    if on_teachers is not None:
        on_teachers(records)
    runs = compare_runs(cfg)
    parallel = parallel or cfg.run.parallel
    if not any(r.distill.teachers == "cache" for r in runs):
        return run_students(runs, parallel)
    if any(r.method.targets in ("refined", "both") for r in runs):
        from raykd.pipeline.cache import build_cache
        from raykd.pipeline.stages.professor import run_professor

        build_cache(cfg, overwrite=overwrite)
        run_professor(cfg)
        return run_students(runs, parallel)
    build = BackgroundBuild(cfg, overwrite)
    build.started()
    log.debug("[run] students start on the cache while it is built")
    try:
        students = run_students(runs, parallel)
    except KeyboardInterrupt:
        raise
    except BaseException:
        build.join()  # the cache is finished before the students' error is raised, or the build's is (their cause)
        raise
    build.join()
    return students
