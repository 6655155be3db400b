"""Progress lines from Ray workers to the driver's console.

Workers put short lines on a `ray.util.queue.Queue` (an actor holding no CPU); a driver thread prints
them as they come. The console then shows raykd's own progress, not Ray's internal logs, which stay
in the Ray session's log folder.
"""

from __future__ import annotations

import queue as _queue
import sys
import threading


class ProgressPrinter:
    """Context manager: `.queue` goes to the workers; lines put there are printed by the driver."""

    def __init__(self, stream=None):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._stream = stream or sys.stdout
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

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self._print(line)
        finally:
            self.queue.shutdown()


def emit(q, line: str) -> None:
    """Called on a worker: send a progress line if there is a queue; never blocks training."""
    if q is None:
        return
    try:
        q.put_nowait(line)
    except Exception:  # a full or vanished queue must not fail a training step
        pass
