"""Progress lines from Ray workers to the driver's console.

Workers put short lines on a `ray.util.queue.Queue` (an actor holding no CPU); a driver thread prints
them as they come. Workers may also put counts, `(key, n)` or `(key, n, batch id)` (a batch a retry
sends again is counted once): the driver sums them and prints one line
of percentages against `totals` every `every` seconds (and once at the end). The console then shows
raykd's own progress, not Ray's internal logs, which stay in the Ray session's log folder (Ray
Data's own progress bars are off unless the console is a terminal).
"""

from __future__ import annotations

import queue as _queue
import threading
import time

from raykd.pipeline.core.log import log


class ProgressPrinter:
    """Context manager: `.queue` goes to the workers; lines put there are printed by the driver."""

    def __init__(self, stream=None, totals: dict[str, int] | None = None, prefix: str = "", every: float = 10.0,
                 local: bool = False):
        """`local`: the counts come from this process (`.queue` is a sink that counts at once), no Ray."""
        if local:
            self.queue = _Counter(self)
        else:
            from ray.util.queue import Queue

            self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._stream = stream  # None: the `raykd` logger
        self._totals, self._prefix, self._every = totals or {}, prefix, every
        self._counts = {k: 0 for k in self._totals}
        self._seen: dict[str, set] = {}
        self._t0 = self._last = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._print(self.queue.get(timeout=0.5))
            except (Empty, _queue.Empty):
                continue
            except Exception:  # the queue actor is gone (Ray shutting down): stop quietly
                return

    def _print(self, item) -> None:
        if isinstance(item, tuple):  # a count from a worker: (key, n[, the batch's identity])
            key, n, *batch = item
            if batch:  # a batch retried after its actor died is counted once
                seen = self._seen.setdefault(key, set())
                if batch[0] in seen:
                    return
                seen.add(batch[0])
            self._counts[key] = self._counts.get(key, 0) + n
            if time.time() - self._last >= self._every:
                self._summary()
            return
        self._say(item)

    def _say(self, line: str) -> None:
        if self._stream is None:
            log.info(line)
        else:
            print(line, file=self._stream, flush=True)

    def _summary(self) -> None:
        self._last = time.time()
        parts = [f"{k} {min(100.0, 100 * self._counts.get(k, 0) / max(1, t)):.0f}%" for k, t in self._totals.items()]
        done = min((self._counts.get(k, 0) for k in self._totals), default=0)
        rate = done / max(1e-9, self._last - self._t0)
        self._say(f"{self._prefix}{'  '.join(parts)}  ({rate:.0f} rows/s)")

    def __enter__(self) -> "ProgressPrinter":
        if not isinstance(self.queue, _Counter):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(self.queue, _Counter):
            if self._totals and exc[0] is None:
                self._summary()
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for item in self.queue.get_nowait_batch(self.queue.qsize()):
                self._print(item)
            if self._totals:
                self._summary()
        finally:
            self.queue.shutdown()


class Console:
    """The sink of jobs that run in the driver's own process: their lines are printed at once."""

    def __init__(self, stream=None):
        self.stream = stream

    def put(self, item) -> None:
        if not isinstance(item, tuple):
            if self.stream is None:
                log.info(item)
            else:
                print(item, file=self.stream, flush=True)


class _Counter(Console):
    """A ProgressPrinter's sink in its own process: lines and counts are handled as they are put."""

    def __init__(self, printer: ProgressPrinter):
        self.printer = printer

    def put(self, item) -> None:
        self.printer._print(item)


def emit(q, item) -> None:
    """Called on a worker: send a progress line (or a `(key, n)` count) if there is a queue. Never blocks:
    the put is a call on the queue's actor whose result nobody waits for (`Queue.put_nowait` would wait
    for it, a round trip per call on the hot path of a cache actor)."""
    if q is None:
        return
    if isinstance(q, Console):
        q.put(item)
        return
    try:
        q.actor.put_nowait.remote(item)
    except Exception:  # a full or vanished queue must not fail a training step
        pass
