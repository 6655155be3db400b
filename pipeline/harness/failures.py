"""Failures of a job: which ones a restart can get past (`transient`: a worker or node that died, a read
or a connection that failed), and the one-line description of one (`describe`, `failure_message`): its
type, message and, for an error in code, its last frames.
"""

from __future__ import annotations

import os
import re
import traceback

from raykd.pipeline.core.errors import RaykdError
from raykd.pipeline.harness.job import Job


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
