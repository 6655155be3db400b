"""The harness's protocol: a stage's `Job` (typed, frozen: what crosses to the worker), the `Task` it builds
in the worker, the loop's `JobResult`, and `EpochSums` (loss terms summed on the device, read once per
epoch).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:  # a job's methods take the context it runs in
    from raykd.pipeline.harness.contexts import Context


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
