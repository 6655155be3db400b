"""Errors a user can act on: the CLI prints them as one short message and exits non-zero.

Anything else that escapes is a bug and keeps its traceback.
"""


class RaykdError(Exception):
    """Base for errors caused by input (config, data, files), not by raykd itself."""


class ConfigError(RaykdError):
    """A config file, override or search space is malformed."""


class DataError(RaykdError):
    """A dataset is missing, unreadable or does not match what the config says."""


class CheckpointError(RaykdError):
    """A checkpoint is missing, corrupt or does not match its recorded hash or architecture."""


class StageFailed(RaykdError):
    """A stage ran but some of its work failed (e.g. a training job); what succeeded is kept. Exit 1.
    `failed`: what failed, by name, and why; `records`: the stage's results in order, None where failed."""

    exit_code = 1

    def __init__(self, message: str, failed: dict[str, str] | None = None, records: list | None = None):
        super().__init__(message)
        self.failed, self.records = failed or {}, records
