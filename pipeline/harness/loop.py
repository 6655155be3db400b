"""The training loop every stage shares: `train_loop` runs a `Job` (harness/job.py) wherever it was started
(harness/runner.py: this process, a Ray task, or each Ray Train worker): the job builds its `Task` in the
worker, then restore -> epochs (steps, loss terms summed on the device) -> evaluate -> report and
checkpoint (harness/contexts.py).
"""

from __future__ import annotations

import json
import os
import time

import torch

from raykd.pipeline.harness.contexts import Context, TrainContext
from raykd.pipeline.harness.job import EpochSums, Job, JobResult, NonFinite
from raykd.pipeline.models import plugins


def _maybe_fail(fault: dict | None, rank: int, epoch: int, step: int) -> None:
    """Fault injection for the tests (RAYKD_FAULT): fail once, at (epoch, step), on rank 0 — the worker's
    process exits (`exit`), a connection drops (`raise`, the default: transient), or code errs (`bug`)."""
    if not fault or rank != 0 or (epoch, step) != (fault["epoch"], fault["step"]) or os.path.exists(fault["marker"]):
        return
    open(fault["marker"], "w").close()
    if fault.get("kind") == "exit":
        os._exit(1)
    if fault.get("kind") == "bug":
        raise TypeError(f"injected bug at epoch {epoch} step {step}")
    raise ConnectionError(f"injected fault at epoch {epoch} step {step}")


def set_threads(job: Job, ctx: Context) -> int:
    """Torch threads: the job's share of the machine's cores (the driver's, on a local Ray), else under
    Ray Train the node's cores split between its workers there, else the CPUs Ray gave this task."""
    n = job.torch_threads
    if not n and isinstance(ctx, TrainContext):
        n = (os.cpu_count() or 1) // max(1, ctx.local_world)
    if not n:
        import ray

        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) if ray.is_initialized() else 0
    n = max(1, n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def train_loop(job: Job, ctx: Context | None = None) -> JobResult:
    """The skeleton: restore -> for each epoch: load its data, train, sum the terms on the device, evaluate,
    report + checkpoint. Returns the last checkpointed state, the metrics of every epoch and a profile."""
    from raykd.pipeline.core.progress import emit

    prof = {"started": time.time(), "build_s": 0.0, "load_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "report_s": 0.0}
    t = time.perf_counter()
    ctx = ctx or TrainContext()
    set_threads(job, ctx)
    if ctx.device.type == "cuda":  # convolutions autotuned for the job's fixed shapes
        torch.backends.cudnn.benchmark = True
    plugins.load(job.imports)
    torch.manual_seed(job.seed)
    task = job.build(ctx)
    start, history, resumed = 0, [], None
    state = ctx.restore()
    if state is not None:  # a restarted worker, or a rerun of an interrupted run (same run name)
        task.load(state["task"])
        start, history = int(state["epoch"]) + 1, json.loads(state["history"])
        resumed = start
        if ctx.rank == 0 and start < job.epochs:
            emit(job.progress, f"[{job.kind} {job.name}] resuming after epoch {start} from its checkpoint")
    task.prepare(ctx)
    prof["build_s"] = time.perf_counter() - t
    last = state
    from raykd.pipeline.harness.tracking import Tracker

    tracker = Tracker(job.tracking if ctx.rank == 0 else None)
    try:
        last, history = _epochs(job, ctx, task, start, history, resumed, last, prof, tracker)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    if last is None and ctx.rank == 0:  # nothing left to train: the restored state is the result
        last = {"task": task.state(), "epoch": job.epochs - 1, "history": json.dumps(history)}
    prof["ended"] = time.time()
    return JobResult(last, history, prof)


def _epochs(job, ctx, task, start, history, resumed, last, prof, tracker):
    from raykd.pipeline.core.progress import emit

    for epoch in range(start, job.epochs):
        t_load = time.perf_counter()
        task.prepare_epoch(epoch)
        t0 = time.perf_counter()
        sums = EpochSums(ctx.device)
        for step, batch in enumerate(task.batches(epoch)):
            _maybe_fail(job.fault, ctx.rank, epoch + 1, step)
            terms, n, correct = task.step(batch, epoch)
            sums.add(step, terms, n, correct)
            if sums.bad is not None:  # stop: every later step would train on nan
                break
        bad = sums.bad or sums.check()
        if bad is not None:
            step, terms = bad
            raise NonFinite(
                f"{job.kind} {job.name}: the loss became {terms['loss']} at epoch {epoch + 1}, step {step + 1} "
                f"({', '.join(f'{k} {v:.4g}' for k, v in terms.items() if k != 'loss')}); the checkpoints of the "
                f"epochs before are kept; lower {task.optim_key}.lr or set {task.optim_key}.grad_clip")
        rows, correct, term_sums = sums.totals(ctx)
        t_eval = time.perf_counter()
        dt = t_eval - t0
        m = {"epoch": epoch + 1, **task.epoch_info(epoch),
             **{f"{task.prefix}{k}": v / max(1, rows) for k, v in term_sums.items()}}
        if sums.correct is not None and task.prefix:
            m["train_acc"] = correct / max(1, rows)
        m.update(task.evaluate(epoch))
        t_report = time.perf_counter()
        m.update({"epoch_time_s": dt, "load_s": t0 - t_load, "eval_s": t_report - t_eval,
                  "samples_per_s": rows / max(dt, 1e-9), "samples": rows, "workers": ctx.world, "resumed_after": resumed})
        history.append(m)
        if ctx.rank == 0:
            emit(job.progress, f"[{job.kind} {job.name}] epoch {epoch + 1}/{job.epochs} {task.line(m)} "
                 f"({dt:.2f}s, {m['samples_per_s']:.0f} samples/s)")
        last = {"task": task.state(), "epoch": epoch, "history": json.dumps(history)} if ctx.rank == 0 else None
        ctx.report(m, last)
        tracker.log(m, epoch + 1)
        for k, v in (("load_s", t0 - t_load), ("train_s", dt), ("eval_s", t_report - t_eval),
                     ("report_s", time.perf_counter() - t_report)):
            prof[k] += v
    return last, history
