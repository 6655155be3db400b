"""Where one command's training jobs run, decided once for the whole command: `Placement`.

Every training stage (teachers, the professor, students, a sweep's trials) asks the same questions
before it starts a job — in this process or as Ray jobs, how many at once, which device, how many torch
threads each, where checkpoints go — and gets its answers here:

    place = Placement.decide(cfg, cfg.teachers.workers, jobs=len(to_train), parallel=cfg.teachers.parallel)
    device = place.start()                        # Ray started when the jobs need it; the device resolved
    refs = place.put("splits", {"train": splits.train, ...})   # values as the jobs get them
    runner = place.runner()                       # a JobRunner for `place.parallel` jobs at a time
    job = MyJob(..., device=device, torch_threads=place.threads(), storage=place.storage)

- `parallel`: the stage's own setting, else as many jobs as the cluster's CPUs fit (which asks Ray),
  never more than there are jobs (`jobs`; None for a sweep, whose trials Tune counts);
- `inline`: a lone one-worker job on this machine runs in this process (`run.in_process`), a Tune
  trial always does;
- `share`: each busy process's torch threads, so that the jobs that run at once (times `concurrent`
  Tune trials beside them) never share a core; None on a cluster, where the workers decide.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from raykd.pipeline.harness import raysetup


@dataclasses.dataclass
class Placement:
    cfg: Any
    workers: Any  # the stage's WorkersSection
    parallel: int
    inline: bool
    share: int | None
    storage: dict
    device: str | None = None
    _refs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def decide(cls, cfg, workers, jobs: int | None, parallel: int | None = None, concurrent: int = 1,
               inline: bool | None = None) -> Placement:
        if jobs == 1:
            parallel = 1
        elif parallel is None:  # as many as the cores fit: Ray says how many it has
            raysetup.init_ray(cfg)
            parallel = raysetup.concurrent_jobs(cfg.ray, workers.cpus_per_worker * workers.num_workers, workers.num_workers)
        parallel = max(1, min(parallel, jobs) if jobs else parallel)
        if inline is None:
            inline = raysetup.in_process(cfg, parallel, workers)
        share = raysetup.local_thread_share(cfg.ray, parallel * concurrent * workers.num_workers)
        return cls(cfg, workers, parallel, inline, share, raysetup.train_storage(cfg))

    def start(self) -> str:
        """Ray started when the jobs run as Ray jobs (once per process); the device, resolved once."""
        if not self.inline:
            raysetup.init_ray(self.cfg)
        if self.device is None:
            self.device = raysetup.resolve_device(self.cfg.run.device)
        return self.device

    def threads(self, workers=None) -> int | None:
        """A job's torch threads: its workers' own setting, else this command's share of the cores."""
        return (workers or self.workers).torch_threads or self.share

    def put(self, key: str, values: dict) -> dict:
        """`values` as the jobs get them: themselves in this process, else Ray object refs (put once per key)."""
        if self.inline:
            return dict(values)
        if key not in self._refs:
            import ray

            self._refs[key] = {k: ray.put(v) for k, v in values.items()}
        return self._refs[key]

    def check_fits(self, key: str, workers=None) -> None:
        """Refuse a worker that no node can hold, before anything is written (Ray would queue it for ever)."""
        if self.inline:
            return
        w = workers or self.workers
        raysetup.check_fits({"CPU": w.cpus_per_worker, "GPU": w.gpus_per_worker if self.start() == "cuda" else 0}, key)

    def runner(self, tune: bool = False):
        from raykd.pipeline.harness.runner import JobRunner

        return JobRunner(self.parallel, inline=self.inline, tune=tune)

    def progress(self):
        """Where the jobs' progress lines go: straight to the console in this process, else through the
        driver's queue (a `ProgressPrinter`); use as a context manager, pass `queue_of(it)` to the jobs."""
        from raykd.pipeline.core.progress import Console, ProgressPrinter

        return contextlib.nullcontext(Console()) if self.inline else ProgressPrinter()


def queue_of(progress):
    """The value a job's `progress` field takes: the printer's queue, or the console itself in process."""
    return getattr(progress, "queue", progress)
