"""`StageDriver`: the submit / run / finish loop every training stage shares (teachers, the professor,
students), over the stage's `Placement`:

    drive = StageDriver(place)
    drive.submit(key, job, finish, start=lambda: log.info("... training"))
    records = drive.run()          # {key: what finish returned}; drive.errors: {key: the error}

- `finish(result, seconds)` turns a job's `JobResult` into the stage's record, its outputs written, as
  soon as that job ends (the others may still run); it may submit the next job of a chain (a student's
  generations), which runs in the same `run()`;
- a job that fails (a `JobFailed`: its own error, after its restarts) or whose finish raises is kept in
  `errors[key]` (and said at once by `failed(key, error)`, if given) and the other jobs go on; the stage
  says how its failures are reported in the end;
- `one(job)` runs a lone job and raises its failure: the professor.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable

from raykd.pipeline.core.errors import StageFailed
from raykd.pipeline.harness.failures import JobFailed, failure_message
from raykd.pipeline.harness.job import Job, JobResult


class StageDriver:
    def __init__(self, place, tune: bool = False, failed: Callable[[Hashable, BaseException], None] | None = None):
        """`failed(key, error)`: said as soon as a job's failure is kept (e.g. a console line)."""
        self.runner, self.failed = place.runner(tune=tune), failed
        self.results: dict[Hashable, Any] = {}
        self.errors: dict[Hashable, BaseException] = {}

    def submit(self, key: Hashable, job: Job, finish: Callable[[JobResult, float], Any],
               start: Callable[[], None] | None = None) -> None:
        """Queue `job`; `start()` is called when it starts, `finish(result, its seconds)` when it ends well."""
        started: list[float] = []

        def on_start() -> None:
            started.append(time.time())
            if start is not None:
                start()

        def on_done(res) -> None:
            try:
                if isinstance(res, JobFailed):
                    raise StageFailed(failure_message(res))
                self.results[key] = finish(res, time.time() - started[-1])
            except Exception as e:  # noqa: BLE001  (kept for the stage to report; the other jobs go on)
                self.errors[key] = e
                if self.failed is not None:
                    self.failed(key, e)

        self.runner.submit(job, on_done, on_start)

    def run(self) -> dict[Hashable, Any]:
        """Run every queued job (and those their finishes queue) to its end; the finished ones' results."""
        self.runner.run()
        return self.results

    def one(self, job: Job) -> JobResult:
        """A lone job run to its end: its result, or its failure raised."""
        self.submit(job.name, job, lambda res, _: res)
        self.run()
        if job.name in self.errors:
            raise self.errors[job.name]
        return self.results[job.name]
