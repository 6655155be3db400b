"""Students over one driver: `run_students` plans every student, runs the ones not already done (in this
process, as Ray tasks, or as Ray Train jobs; `run.parallel` at a time) and writes their outputs;
`run_distill` is one student.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from raykd.methods import METHODS
from raykd.pipeline.core.config import Config, variant, write_resolved
from raykd.pipeline.core.errors import RaykdError, StageFailed
from raykd.pipeline.core.log import log
from raykd.pipeline.core.progress import ProgressPrinter
from raykd.pipeline.core.records import out_root, output_lock
from raykd.pipeline.harness.driver import StageDriver
from raykd.pipeline.harness.placement import Placement
from raykd.pipeline.stages.distill import (
    finish_student,
    make_job,
    plan_student,
    student_dir,
    student_name,
    student_record,
)


def _say(queue, line: str) -> None:
    """A console line: printed here, or sent to the driver when this runs in a Tune trial (`raykd sweep`)."""
    if queue is None:
        log.info(line)
    else:
        from raykd.pipeline.core.progress import emit

        emit(queue, line)


class _Students:
    """Plans, runs and finishes a list of students: each config's chain (Method.chain) in turn, the chains
    side by side, `place.parallel` jobs at a time; a student that fails does not stop the others."""

    def __init__(self, cfgs: list[Config], place: Placement, say, tune: bool, stack: contextlib.ExitStack,
                 concurrent: int = 1):
        # say: the progress queue of the driver when this is a Tune trial, where every line goes; else None:
        # the driver's lines are printed here, the jobs' sent to a ProgressPrinter made with the first job
        self.cfgs, self.progress, self.place, self.tune, self.stack = cfgs, say, place, tune, stack
        self._queue = say
        self.drive = StageDriver(place, tune=tune)
        self.concurrent = concurrent  # jobs on this machine at once: its memory is shared between them
        self.splits: dict[str, Any] = {}
        self.records: list[dict | None] = [None] * len(cfgs)

    @property
    def errors(self) -> dict[int, BaseException]:
        """Each config's failure, by its index: its plan's (bad input), or its job's or finish's (the driver's)."""
        return self.drive.errors

    @property
    def queue(self):
        if self._queue is None:
            from raykd.pipeline.core.progress import Console

            self._queue = Console() if self.place.inline else self.stack.enter_context(ProgressPrinter()).queue
        return self._queue

    def _splits(self, cfg: Config):
        from raykd.pipeline.data.splits import load_splits

        key = cfg.data.model_dump_json()
        if key not in self.splits:
            self.splits[key] = load_splits(cfg.data)
        return self.splits[key]

    def start(self, i: int, chain: list[Config], done: list[dict]) -> None:
        """Plan the next student of config i's chain and submit its job (or take its finished record)."""
        from raykd.pipeline.harness.raysetup import init_ray

        while True:
            cfg = chain[len(done)]
            t = time.perf_counter()
            try:
                splits = self._splits(cfg)
                t_plan = time.perf_counter()
                plan = plan_student(cfg, splits)
            except Exception as e:  # noqa: BLE001  (bad input for this student only; reported at the end)
                self.errors[i] = e
                return
            if isinstance(plan, dict):
                sdir = student_dir(cfg)  # its folder's name: a renamed folder keeps its record's
                _say(self.progress, f"[distill] {os.path.basename(sdir)}: up to date ({sdir}), not retrained")
                done.append(plan)
                if len(done) == len(chain):
                    return self._chain_done(i, chain, done)
                continue
            break
        plan.times = {"data_s": t_plan - t, "plan_s": time.perf_counter() - t_plan}
        t = time.perf_counter()
        self.place.start()  # Ray, when the jobs run as Ray jobs; the device
        d = cfg.distill
        refs = self.place.put(cfg.data.model_dump_json(), {k: getattr(plan.splits, k) for k in ("train", "val", "test")})
        try:
            job = make_job(plan, refs, self.queue, self.place, self.place.parallel * self.concurrent)
        except Exception as e:  # noqa: BLE001  (a cache without what this student reads)
            self.errors[i] = e
            return
        if not job.in_memory:  # streamed views: Ray Data reads them, in this process too
            init_ray(cfg)
        plan.times["ray_init_s"] = time.perf_counter() - t
        # refused before anything is written, rather than queued for ever
        self.place.check_fits("distill.workers.cpus_per_worker/gpus_per_worker", d.workers)
        try:  # one process trains a student at a time; it may have finished it meanwhile
            self.stack.enter_context(output_lock(plan.sdir, f"training of student {plan.name!r}"))
            rec = student_record(plan.sdir).reusable(plan.fp)
        except RaykdError as e:
            self.errors[i] = e
            return
        if rec is not None:
            _say(self.progress, f"[distill] {plan.name}: up to date ({plan.sdir}), trained meanwhile by another process")
            done.append(rec)
            return self._chain_done(i, chain, done) if len(done) == len(chain) else self.start(i, chain, done)
        write_resolved(cfg, plan.sdir)

        def on_start():
            plan.t0 = time.time()
            _say(self.progress, f"[distill] {plan.name}: {cfg.method.name} -> {d.student.arch} "
                 f"({plan.student.num_params():,} params), {'teachers online' if plan.online else 'from the cache'}"
                 f"{' ' + str(plan.teachers) if plan.teachers else ''}, {d.optim.epochs} epochs over K={plan.views} "
                 f"views, {d.workers.num_workers} worker(s), {'in memory' if job.in_memory else 'streamed'}")

        def finish(out, _seconds):
            rec = finish_student(plan, out)
            _say(self.progress, f"[distill] {plan.name}: done, val {rec['val_acc']:.4f} test {rec['test_acc']:.4f} "
                 f"-> {plan.sdir}")
            done.append(rec)
            if len(done) == len(chain):
                self._chain_done(i, chain, done)
            else:  # the chain's next student, in the same run
                self.start(i, chain, done)

        self.drive.submit(i, job, finish, start=on_start)

    def _chain_done(self, i: int, chain: list[Config], done: list[dict]) -> None:
        rec = METHODS.get(chain[-1].method.name).summarise(done, student_dir(chain[-1]))
        if len(done) > 1:
            for line in METHODS.get(rec["method"]).notes(rec):
                _say(self.progress, f"[distill] {line}")
        self.records[i] = rec

    def run(self) -> None:
        for i, cfg in enumerate(self.cfgs):
            chain = [variant(cfg, changes, "method chain") for changes in
                     METHODS.get(cfg.method.name).chain(cfg, student_name(cfg))]
            self.start(i, chain, [])
        self.drive.run()


def run_students(cfgs: list[Config], parallel: int | None = None, *, progress=None, tune: bool = False,
                 concurrent: int = 1) -> list[dict]:
    """Distil several students (`raykd run`), `parallel` jobs at a time (default: as many as the cores fit);
    returns their records. A failed student does not stop the others; the failures are reported together
    at the end (exit 1). `tune`: this is a Ray Tune trial (`raykd sweep`): its jobs run in this process,
    reporting every epoch to Tune; `concurrent` trials share the node's cores."""
    for out in {c.run.out_dir: c for c in cfgs}.values():
        out_root(out)  # usable, before anything starts
    place = Placement.decide(cfgs[0], cfgs[0].distill.workers, jobs=1 if tune else len(cfgs), parallel=parallel,
                             concurrent=concurrent, inline=True if tune else None)
    if len(cfgs) > 1:
        log.info(f"[distill] {len(cfgs)} students, {place.parallel} at a time")
    with contextlib.ExitStack() as stack:
        s = _Students(cfgs, place, progress, tune, stack, concurrent)
        s.run()
    if len(cfgs) == 1 and s.errors:
        raise s.errors[0]
    if s.errors:
        failed = {}
        for i, e in sorted(s.errors.items()):
            failed[student_name(cfgs[i])] = (str(e) if isinstance(e, RaykdError) else
                                             (str(e).strip().splitlines() or [type(e).__name__])[-1])
        raise StageFailed("some students failed (the others are saved):\n  " + "\n  ".join(
            f"{n}: {msg}" for n, msg in failed.items()), failed, s.records)
    return s.records


def run_distill(cfg: Config, progress=None, concurrent: int = 1, tune: bool = False) -> dict:
    """Distil one student as configured; returns its record (also written as student.json).

    `progress`: the driver's progress queue when this runs in a Tune trial next to `concurrent - 1`
    others (`raykd sweep`), whose jobs share the node's cores; `tune`: report each epoch to Tune."""
    return run_students([cfg], 1, progress=progress, tune=tune, concurrent=concurrent)[0]
