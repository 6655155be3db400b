"""One training harness for teachers, the professor and students.

A stage describes a training job as a typed, frozen `Job` (what crosses to the worker process); the
job builds its `Task` (models, optimisers, data) in the worker, and `train_loop` runs the skeleton every
stage shares: restore -> epochs (steps, loss terms summed on the device) -> evaluate -> report and
checkpoint. `JobRunner` is the one place that starts jobs:

- one worker: the loop runs in a Ray task (a worker process holding `cpus_per_worker`), or in this very
  process when it already is one (a Ray Tune trial). Checkpoints go to `<storage>/<run name>/`; a failed
  or killed task is started again from its newest checkpoint, up to `max_failures` times; a rerun of the
  same command resumes there too. No Train controller, worker group or process group to start.
- several workers: Ray Train's `TorchTrainer` (DDP, `FailureConfig`, its own checkpoints under the same
  run name), launched from a CPU-less Ray task so several jobs can run at once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
import traceback
from typing import Any, Callable, Iterable

import torch
from raykd.pipeline.core.errors import CheckpointError, RaykdError, StageFailed
from raykd.pipeline.core.records import LatestCheckpoint, check
from raykd.pipeline.models import plugins

STATE_FILE = "train_state.pt"
LATEST = "latest.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """A training job as it crosses to its worker: plain values, pydantic sections and Ray object refs
    (nothing read from the driver's disk). Subclasses add their own fields and `build`."""

    kind: str  # console prefix: teacher, professor, distill
    name: str
    run_name: str  # checkpoints live in <storage>/<run_name>/: the same name on a rerun resumes
    seed: int
    epochs: int
    workers: Any  # WorkersSection
    storage: dict  # raysetup.train_storage(cfg)
    device: str = "cpu"
    torch_threads: int | None = None
    progress: Any = None  # the driver's progress queue
    fault: dict | None = None  # fault injection for the tests (RAYKD_FAULT)
    keep: int = 2  # checkpoints kept
    imports: tuple = ()  # plugins.job_imports: user modules the worker imports before it builds anything
    tracking: dict | None = None  # tracking.tracking_spec: TensorBoard / MLflow, logged by rank 0

    def build(self, ctx: "Context") -> "Task":
        raise NotImplementedError

    def datasets(self) -> dict:
        """Ray Datasets a multi-worker job streams (Ray Train splits them between its workers)."""
        return {}


class Task:
    """What one job trains, built in the worker. `step` does one optimisation step and returns
    (loss terms as tensors, rows, correct predictions or None); `batches(epoch)` the epoch's batches,
    after `prepare_epoch(epoch)` loaded what the epoch reads (timed apart from the training loop)."""

    prefix = "train_"  # of the loss terms' metric names
    optim_key = "distill.optim"  # the config section of its optimiser, for messages

    def prepare(self, ctx: "Context") -> None:
        """After a restore: wrap what trains for the context (DDP under Ray Train)."""

    def prepare_epoch(self, epoch: int) -> None:
        pass

    def batches(self, epoch: int) -> Iterable:
        raise NotImplementedError

    def step(self, batch, epoch: int) -> tuple[dict[str, torch.Tensor], int, torch.Tensor | None]:
        raise NotImplementedError

    def evaluate(self, epoch: int) -> dict:
        """Metrics on the held-out splits after `epoch` (0-based)."""
        return {}

    def epoch_info(self, epoch: int) -> dict:
        return {}

    def state(self) -> dict:
        raise NotImplementedError

    def load(self, state: dict) -> None:
        raise NotImplementedError

    def line(self, m: dict) -> str:
        return ""


class NonFinite(FloatingPointError):
    pass


@dataclasses.dataclass
class JobResult:
    """A finished job: its last state (rank 0's checkpoint), every epoch's metrics, and where its time went
    (`profile`: seconds of each phase of the loop, and when it started and ended; one-worker jobs only)."""

    state: dict
    history: list[dict]
    profile: dict | None = None


class EpochSums:
    """An epoch's loss terms (weighted by rows), rows and correct predictions, summed on the device: the
    host reads them once per epoch. Every `every` steps one sync checks that the loss stayed finite, and a
    loss that did not is named at its own step (the weights after it are never checkpointed)."""

    def __init__(self, device, every: int = 32):
        self.device, self.every = device, every
        self.names: list[str] | None = None
        self.sums = self.correct = None
        self.rows = 0
        self.window: list[tuple[int, torch.Tensor]] = []
        self.bad: tuple[int, dict[str, float]] | None = None  # (step, terms) of a non-finite loss

    def add(self, step: int, terms: dict[str, torch.Tensor], n: int, correct: torch.Tensor | None) -> None:
        if self.names is None:
            self.names = list(terms)
            self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
            self.correct = torch.zeros((), dtype=torch.float64, device=self.device)
        v = torch.stack([terms[k].detach().float() for k in self.names])
        self.sums += v * n
        if correct is not None:
            self.correct += correct
        self.rows += n
        self.window.append((step, v))
        if len(self.window) >= self.every:
            self.bad = self.check()

    def check(self) -> tuple[int, dict[str, float]] | None:
        """(step, terms) of the first step whose loss is not finite since the last check, else None."""
        if not self.window:
            return None
        i = self.names.index("loss")
        losses = torch.stack([v[i] for _, v in self.window])
        bad = None
        if not bool(torch.isfinite(losses).all()):
            step, v = self.window[int((~torch.isfinite(losses)).nonzero()[0])]
            bad = (step, dict(zip(self.names, v.tolist())))
        self.window.clear()
        return bad

    def totals(self, ctx: "Context") -> tuple[int, float, dict[str, float]]:
        """(rows, correct, {term: sum}) over every worker."""
        names = self.names or []
        t = torch.cat([torch.tensor([float(self.rows)], dtype=torch.float64, device=self.device),
                       (self.correct if self.correct is not None else torch.zeros((), dtype=torch.float64,
                                                                                    device=self.device)).reshape(1),
                       self.sums if self.sums is not None else torch.zeros(0, dtype=torch.float64, device=self.device)])
        t = ctx.all_reduce(t).cpu().tolist()
        return int(t[0]), t[1], dict(zip(names, t[2:]))


# --------------------------------------------------------------------------------------------------
# where the loop runs: a Ray Train worker, or one process of its own


class Context:
    rank = 0
    world = 1
    device = torch.device("cpu")

    def restore(self) -> dict | None:
        raise NotImplementedError

    def report(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shard(self, name: str):
        raise RaykdError(f"dataset {name!r} is only streamed under Ray Train")


class TrainContext(Context):
    """Inside a Ray Train worker: its rank, DDP, Ray Train's checkpoints and dataset shards."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        c = ray.train.get_context()
        self.rank, self.world = c.get_world_rank(), c.get_world_size()
        self.local_world = c.get_local_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        try:
            with ckpt.as_directory() as d:
                return _load_state(open(os.path.join(d, STATE_FILE), "rb").read())
        except Exception as e:
            raise _unreadable(ckpt.path, os.path.dirname(ckpt.path.rstrip("/")), e) from None

    def report(self, metrics: dict, state: dict | None) -> None:
        """`ray.train.report` on every worker (a barrier); rank 0 attaches the checkpoint."""
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)


class LocalContext(Context):
    """One process trains alone: checkpoints in a `CheckpointStore`; each epoch also reported to Ray Tune
    when this process is a Tune trial."""

    def __init__(self, job: Job, tune: bool = False):
        self.store = CheckpointStore(job.storage, job.run_name, job.keep)
        self.tune = tune
        self.device = torch.device("cuda" if job.device == "cuda" and torch.cuda.is_available() else "cpu")
        self.last_state: dict | None = None

    def restore(self) -> dict | None:
        return self.store.latest()

    def report(self, metrics: dict, state: dict | None) -> None:
        self.store.save(state, int(metrics["epoch"]))
        self.last_state = state
        if self.tune:
            from ray import tune

            tune.report({k: v for k, v in metrics.items() if v is not None})


def _load_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _unreadable(path: str, run_dir: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unreadable ({e.__class__.__name__}: {str(e)[:200]}); it is kept, with the ones "
        f"before it (training resumes from the newest only). To start this run over, remove {run_dir} "
        "(a student can also take another distill.name)")


class CheckpointStore:
    """A single-worker job's checkpoints: `<storage>/<run>/checkpoint_<epoch>/train_state.pt` (the file
    Ray Train's checkpoints hold too), the newest named by `<run>/latest.json`, written after the state it
    names; the `keep` newest are kept. Local disk or any pyarrow filesystem (S3 with run.storage_path)."""

    def __init__(self, storage: dict, run_name: str, keep: int = 2):
        from pyarrow import fs as pafs

        if storage.get("storage_filesystem") is not None:
            self.fs, base = storage["storage_filesystem"], storage["storage_path"]
        else:
            self.fs, base = pafs.FileSystem.from_uri(storage["storage_path"])
        self.dir = f"{base.rstrip('/')}/{run_name}"
        self.display = (storage["storage_path"] if "://" in storage["storage_path"] or
                        storage.get("storage_filesystem") is None else "s3://" + storage["storage_path"])
        self.display = f"{self.display.rstrip('/')}/{run_name}"
        self.keep = keep

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def latest(self) -> dict | None:
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(f"{self.dir}/{LATEST}")
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            name = check(json.loads(self._read(f"{self.dir}/{LATEST}")), LatestCheckpoint,
                         f"{self.display}/{LATEST}", "checkpoint pointer")["checkpoint"]
        except (ValueError, RaykdError) as e:
            raise _unreadable(f"{self.display}/{LATEST}", self.display, e) from None
        path = f"{self.dir}/{name}/{STATE_FILE}"
        try:
            return _load_state(self._read(path))
        except Exception as e:
            raise _unreadable(f"{self.display}/{name}", self.display, e) from None

    def save(self, state: dict | None, epoch: int) -> None:
        from pyarrow import fs as pafs

        if state is None:
            return
        name = f"checkpoint_{epoch:06d}"
        self.fs.create_dir(f"{self.dir}/{name}", recursive=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        self._write(f"{self.dir}/{name}/{STATE_FILE}", buf.getvalue())
        self._write(f"{self.dir}/{LATEST}", json.dumps({"checkpoint": name, "epoch": epoch}).encode())
        old = sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.dir))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        for stale in old[:-self.keep]:
            self.fs.delete_dir(f"{self.dir}/{stale}")


# --------------------------------------------------------------------------------------------------
# the loop every job runs


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


def _cause(e: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (a task's error, a Ray Train worker's failure)."""
    for exc in (getattr(e, "worker_failures", None) or {}).values():
        return _cause(exc)
    cause = getattr(e, "cause", None)
    return _cause(cause) if isinstance(cause, BaseException) and cause is not e else e


# Ray's errors for a worker, actor, node or object that went away: a restart can get past them
_SYSTEM_ERRORS = {"WorkerCrashedError", "RayActorError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError",
                  "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError",
                  "OutOfMemoryError", "RaySystemError"}


def transient(e: BaseException) -> bool:
    """A failure that a restart can get past: the worker's process or node died, a read or a connection
    failed. Bad input, a loss that is no longer finite, a damaged file and errors in code come back on
    every attempt: they are not retried."""
    c = _cause(e)
    if isinstance(c, (RaykdError, FloatingPointError)):
        return False
    return isinstance(c, OSError) or type(c).__name__ in _SYSTEM_ERRORS


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def describe(e: BaseException, frames: int = 3) -> str:
    """The worker's own error: its type and message, and for an error in code the last frames of its
    traceback (file:line in function), wherever it was raised (this process, a Ray task, a Train worker)."""
    c = _cause(e)
    lines = [ln.strip() for ln in str(c).splitlines() if ln.strip()]
    if isinstance(c, (RaykdError, FloatingPointError)):
        return " ".join(lines)[:2000]
    if c.__traceback__ is not None:
        found = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(c.__traceback__)]
    else:  # raised in another process: its traceback travelled as text
        found = [(m.group(1), int(m.group(2)), m.group(3)) for m in _FRAME.finditer(str(e))]
    message = next((ln for ln in lines if not ln.startswith(("File ", "Traceback", "ray::"))), "")
    head = f"{type(c).__name__}: {message[:500]}" if message else type(c).__name__
    if not found or transient(e):
        return head
    where = "; ".join(f"{_short(path)}:{line} in {fn}" for path, line, fn in found[-frames:])
    return f"{head} (at {where})"


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


class JobFailed(Exception):
    def __init__(self, job: Job, reason: str, retryable: bool, input_error: bool = False, attempts: int = 1):
        super().__init__(reason)
        self.job, self.reason, self.retryable, self.input_error, self.attempts = \
            job, reason, retryable, input_error, attempts

    @classmethod
    def of(cls, job: Job, e: BaseException, attempts: int = 1) -> "JobFailed":
        c = _cause(e)
        return cls(job, describe(e), transient(e), isinstance(c, (RaykdError, FloatingPointError)), attempts)


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


def fit(job: Job, inline: bool = False, tune: bool = False) -> JobResult:
    """Run one job to its end; a failure is a StageFailed."""
    out: list = []
    runner = JobRunner(1, inline=inline, tune=tune)
    runner.submit(job, out.append)
    runner.run()
    if isinstance(out[0], JobFailed):
        raise StageFailed(failure_message(out[0]))
    return out[0]


def failure_message(f: JobFailed) -> str:
    """The console's account of a failed job: the worker's own error, and the advice that fits it."""
    what = "distillation" if f.job.kind == "distill" else f"{f.job.kind} training"
    if f.input_error:  # bad input, a damaged file, a diverging loss: the message says what to do
        return f"{what} of {f.job.name} failed: {f.reason}"
    if not f.retryable:
        return (f"{what} of {f.job.name} failed: {f.reason}. Not retried: an error in code comes back on every "
                "attempt; once it is fixed, the same command resumes from the checkpoints kept")
    from raykd.pipeline.harness.raysetup import logs_hint

    tries = f" after {f.attempts} attempts" if f.attempts > 1 else ""
    return (f"{what} of {f.job.name} failed{tries} ({f.reason}); its checkpoints are kept: rerun the same command "
            f"to resume{logs_hint()}")
