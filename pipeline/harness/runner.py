"""`JobRunner`, the one place that starts jobs: one worker in a Ray task (restarted from its newest
checkpoint up to `max_failures` times) or in this process (a Tune trial, `inline`); several on Ray
Train's `TorchTrainer`, launched from a CPU-less Ray task so that several jobs can run at once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from raykd.pipeline.harness.contexts import STATE_FILE, LocalContext, _load_state
from raykd.pipeline.harness.failures import JobFailed, describe, transient
from raykd.pipeline.harness.job import Job, JobResult
from raykd.pipeline.harness.loop import train_loop


def _train_worker(config: dict):
    """Ray Train's entry point on every worker."""
    train_loop(config["job"])


def run_local(job: Job, tune: bool = False) -> JobResult:
    """A one-worker job in this process (a Ray task, or a Tune trial)."""
    return train_loop(job, LocalContext(job, tune=tune))


def run_train(job: Job, tune: bool = False) -> JobResult:
    """A multi-worker job on Ray Train: the one place a TorchTrainer is built."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raykd.pipeline.harness.raysetup import TRAIN_LOG_LEVEL, scaling

    callbacks = None
    if tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    datasets = job.datasets()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job},
        scaling_config=scaling(job.workers, job.device == "cuda"),
        run_config=ray.train.RunConfig(
            name=job.run_name, **job.storage,
            logging_config=ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL),
            failure_config=ray.train.FailureConfig(max_failures=job.workers.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep),
            callbacks=callbacks),
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)) if datasets else None,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # after Ray Train's own restarts (FailureConfig)
        raise JobFailed.of(job, e, job.workers.max_failures + 1) from None
    with result.checkpoint.as_directory() as d:
        state = _load_state(open(os.path.join(d, STATE_FILE), "rb").read())
    return JobResult(state, json.loads(state["history"]))


WORKERS_KEY = {"teacher": "teachers.workers", "distill": "distill.workers", "professor": "professor.workers"}


class JobRunner:
    """Runs training jobs, `parallel` at a time, each in its own Ray task (one-worker jobs hold the
    worker's CPUs; multi-worker ones launch Ray Train from a CPU-less task); `inline` runs them one after
    another in this process (a lone job on this machine, or a Tune trial). `on_start()` is called when a job starts, `on_done(its JobResult
    or a JobFailed)` when it ends; it may submit more jobs."""

    def __init__(self, parallel: int = 1, inline: bool = False, tune: bool = False):
        self.parallel, self.inline, self.tune = max(1, parallel), inline, tune
        self.queue: list[tuple[Job, Callable, Callable | None]] = []
        self.pending: dict = {}  # ref -> (job, on_done, attempt)

    def submit(self, job: Job, on_done: Callable[[Any], None], on_start: Callable[[], None] | None = None) -> None:
        self.queue.append((job, on_done, on_start))

    def _start(self, job: Job, on_done, attempt: int) -> None:
        import ray

        from raykd.pipeline.harness.raysetup import check_fits

        check_fits({"CPU": job.workers.cpus_per_worker, "GPU": job.workers.gpus_per_worker if job.device == "cuda" else 0},
                   f"{WORKERS_KEY.get(job.kind, job.kind)}.cpus_per_worker/gpus_per_worker")
        if job.workers.num_workers > 1:
            fn = ray.remote(num_cpus=0, max_retries=0)(run_train)
        else:
            res = {"num_cpus": job.workers.cpus_per_worker}
            if job.device == "cuda":
                res["num_gpus"] = job.workers.gpus_per_worker
            fn = ray.remote(max_retries=0, **res)(run_local)
        self.pending[fn.remote(job, self.tune)] = (job, on_done, attempt)

    def _run_here(self, job: Job):
        """A job in this process. An error is retried from the newest checkpoint up to max_failures times,
        unless it would come back (in a Tune trial, Tune starts the failed trial again)."""
        attempt = 0
        while True:
            try:
                return run_train(job, self.tune) if job.workers.num_workers > 1 else run_local(job, self.tune)
            except JobFailed as e:
                return e
            except Exception as e:  # noqa: BLE001  (the job's own error: reported, or retried)
                if not transient(e):
                    return JobFailed.of(job, e, attempt + 1)
                if self.tune:
                    raise
                if attempt >= job.workers.max_failures:
                    return JobFailed.of(job, e, attempt + 1)
                attempt += 1
                from raykd.pipeline.core.progress import emit

                emit(job.progress, f"[{job.kind} {job.name}] failed ({describe(e)}); restarting from its "
                     f"newest checkpoint (attempt {attempt + 1} of {job.workers.max_failures + 1})")

    def run(self) -> None:
        if self.inline:
            while self.queue:
                job, on_done, on_start = self.queue.pop(0)
                if on_start:
                    on_start()
                on_done(self._run_here(job))
            return
        import ray

        while self.queue or self.pending:
            while self.queue and len(self.pending) < self.parallel:
                job, on_done, on_start = self.queue.pop(0)
                if on_start:
                    on_start()
                self._start(job, on_done, 0)
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            job, on_done, attempt = self.pending.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, JobFailed):
                    out = cause
                elif job.workers.num_workers == 1 and attempt < job.workers.max_failures and transient(e):
                    # a failed or killed one-worker job starts again from its newest checkpoint
                    from raykd.pipeline.core.progress import emit

                    emit(job.progress, f"[{job.kind} {job.name}] failed ({describe(e)}); restarting from its "
                         f"newest checkpoint (attempt {attempt + 2} of {job.workers.max_failures + 1})")
                    self._start(job, on_done, attempt + 1)
                    continue
                else:
                    out = JobFailed.of(job, e, attempt + 1)
            on_done(out)

