"""raykd's console output: the `raykd` logger.

Every stage's progress lines ("[cache] ...", "[distill ...] epoch ...") and the tables the commands print
go to `logging.getLogger("raykd")`. By default it has one handler that writes each message as it is to
the current `sys.stdout` at INFO, and does not propagate, so raykd prints the same in a terminal, a
notebook or a test. To change that from Python: `logging.getLogger("raykd").setLevel(logging.WARNING)`
(quiet), or remove its handler and set `propagate = True` to send it to your own logging setup. The CLI
maps `-q` to WARNING and `-v` to DEBUG.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("raykd")


class _Stdout(logging.Handler):
    """The message alone, to whatever sys.stdout is when it is emitted (a test's capture, a notebook)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never break a run
            self.handleError(record)


if not log.handlers:
    log.addHandler(_Stdout())
    log.propagate = False
if log.level == logging.NOTSET:  # a level the user set before raykd was imported stays
    log.setLevel(logging.INFO)


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
