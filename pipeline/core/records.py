"""What stages write and read back: the output folders under `run.out_dir`, JSON records written whole or
not at all and read against a schema, and the lock that lets one process at a time write an output.

Every JSON file raykd reads back (a cache's manifest and commit records, a teacher's, the professor's or a
student's record) is checked against its schema here: a file of another shape is one `RaykdError` naming
it ("<file>: not a raykd <kind> (...)"), never an AttributeError deep in a stage. The schemas hold what
raykd reads; other fields are kept as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import threading
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from raykd.pipeline.core.errors import ConfigError, RaykdError

# --------------------------------------------------------------------------------------------------
# schemas


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


def _file_name(v: str) -> str:
    if not v or "/" in v or "\\" in v or v in (".", ".."):
        raise ValueError(f"{v!r} is not a file name in its folder")
    return v


def _part_path(v: str) -> str:
    if not re.fullmatch(r"(views|refined)/view=\d+/[^/\\]+\.parquet", v) or "/../" in f"/{v}/":
        raise ValueError(f"{v!r} is not a part file of the cache (views/view=<k>/<file>.parquet or refined/...)")
    return v


FileName = Annotated[str, AfterValidator(_file_name)]
PartPath = Annotated[str, AfterValidator(_part_path)]
Count = Annotated[int, Field(ge=0)]


class PartFile(_Record):
    path: PartPath
    rows: Count
    bytes: Count
    sha256: str


class CachedTeacher(_Record):
    name: str
    arch: str
    checkpoint_sha256: str
    val_acc: float
    layers: dict[str, list[int]] = {}


class CachedData(_Record):
    name: str
    fingerprint: str
    num_classes: Annotated[int, Field(gt=0)]
    train_samples: Count
    image_shape: list[int]


class CachedTopK(_Record):
    k: Annotated[int, Field(gt=0)]
    of: str
    temperature: float


class CachedTargets(_Record):
    logits: bool
    topk: CachedTopK | None = None


class CachedProfessor(_Record):
    fingerprint: str
    files: list[PartFile]


class Manifest(_Record):
    schema_version: int
    fingerprint: str
    views: Annotated[int, Field(gt=0)]
    dataset: CachedData
    policy: dict[str, Any]
    store_views: bool
    targets: CachedTargets
    teachers: list[CachedTeacher]
    columns: dict[str, str]
    shapes: dict[str, list[int]]
    files: list[PartFile]
    rows: Count
    bytes: Count
    professor: CachedProfessor | None = None


class ViewCommit(_Record):
    fingerprint: str
    view: Count
    files: list[PartFile]
    rows: Count


class BuildStarted(_Record):
    fingerprint: str
    manifest: dict | None = None  # the manifest of the views committed so far (students train on them meanwhile)
    error: str | None = None  # why the build failed, for the students waiting on it


class LockOwner(_Record):
    host: str | None = None
    pid: int | None = None


class LockRecord(_Record):
    token: str
    owner: LockOwner = LockOwner()
    heartbeat: float = 0.0


class Checkpoint(_Record):
    file: FileName
    sha256: str


class Gate(_Record):
    passed: bool
    min_val_acc: float


class TeacherRecord(_Record):
    fingerprint: str
    arch: str
    best: Checkpoint
    last: Checkpoint | None = None
    val_acc: float
    test_acc: float
    gate: Gate


class ProfessorRecord(_Record):
    fingerprint: str
    file: FileName
    sha256: str


class StudentRecord(_Record):
    name: str
    method: str
    arch: str
    fingerprint: str
    files: dict[FileName, str]
    val_acc: float
    test_acc: float


class LatestCheckpoint(_Record):
    checkpoint: Annotated[str, Field(pattern=r"^checkpoint_\d{6}$")]
    epoch: int


class DataStats(_Record):
    mean: list[float]
    std: list[float]


def check(obj: Any, schema: type[BaseModel], where: str, kind: str, error: type[RaykdError] = RaykdError) -> dict:
    """`obj` (parsed JSON) if it has the shape of `schema`, else `error`: '<where>: not a raykd <kind> (...)'."""
    if not isinstance(obj, dict):
        raise error(f"{where}: not a raykd {kind} (a JSON {type(obj).__name__}, not an object)")
    try:
        schema.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top level>"
        more = f"; {e.error_count() - 1} more" if e.error_count() > 1 else ""
        raise error(f"{where}: not a raykd {kind} ({loc}: {first['msg'].removeprefix('Value error, ')}{more})") from None
    return obj


# --------------------------------------------------------------------------------------------------
# local records


def load_record(path: str, schema: type[BaseModel], kind: str, missing_ok: bool = True) -> dict | None:
    """A record on local disk, checked against `schema`; None when it does not exist (and `missing_ok`).
    Unreadable JSON, or JSON of another shape: RaykdError naming the file."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise RaykdError(f"{path}: no such {kind}") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, bad UTF-8
        raise RaykdError(f"{path}: not a readable {kind} ({e.__class__.__name__}: {e})") from None
    return check(obj, schema, path, kind)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """A temporary name beside `path` for the block to write; moved onto `path` when the block ends (a
    rename: readers see the old file or the whole new one, never a part), removed if it raises."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_record(path: str, obj: Any, indent: int | None = 2) -> None:
    """Write JSON whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


# --------------------------------------------------------------------------------------------------
# where outputs go


def out_root(cfg) -> str:
    """`run.out_dir` as an absolute path, created if need be; ConfigError naming it when it cannot be
    (under a regular file, a read-only or virtual file system, no permission)."""
    out = os.path.abspath(cfg.run.out_dir)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".raykd-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"run.out_dir={cfg.run.out_dir}: not a folder raykd can write in ({e.strerror or e})") from None
    return out


def inside(root: str, *parts: str) -> str:
    """`root/parts...`, refused unless it stays inside `root` (no `..`, no absolute part)."""
    path = os.path.normpath(os.path.join(root, *parts))
    if os.path.commonpath([path, os.path.normpath(root)]) != os.path.normpath(root) or path == os.path.normpath(root):
        raise ConfigError(f"{posixpath.join(*parts)!r} would write outside {root}")
    return path


OUTPUT_LOCK = ".raykd.lock"


def output_lock(folder: str, what: str):
    """The lock of one output folder (a student's, the teachers', the professor's, a sweep's): the cache's
    lock (raykd.pipeline.cache.storage.Lock) on local disk. A second process that wants to write the same output is
    refused, naming the running one; a dead owner's lock is taken over."""
    import fsspec

    from raykd.pipeline.cache.storage import Lock  # storage reads its records with this module's schemas

    os.makedirs(folder, exist_ok=True)
    return Lock(fsspec.filesystem("file"), folder, folder, name=OUTPUT_LOCK, what=what,
                then="or give this one another name or run.out_dir")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """A stage output's record and the files it vouches for, one for every stage (a teacher, the professor,
    a student): `read` (None when there is none; an error naming it, and what to do, when it is not one),
    `write` (atomic), `intact` (every file it lists matches its sha256) and `reusable(fp)` (the record of
    this fingerprint with its files intact, else None: the stage trains again)."""

    path: str  # the record file; the files it lists are relative to its folder
    schema: type[BaseModel]
    kind: str  # "teacher record", ...: how errors name it
    files: Callable[[dict], dict[str, str]]  # the record -> {file: sha256}
    again: str = ""  # appended to a read error: what to do with a bad record
    error: type[RaykdError] = RaykdError

    def read(self) -> dict | None:
        try:
            return load_record(self.path, self.schema, self.kind)
        except RaykdError as e:
            if not self.again:
                raise
            raise self.error(f"{e}; {self.again}") from None

    def write(self, rec: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        write_record(self.path, rec)

    def intact(self, rec: dict) -> bool:
        folder = os.path.dirname(self.path)
        try:
            return all(sha256_file(os.path.join(folder, f)) == sha for f, sha in self.files(rec).items())
        except (OSError, KeyError, TypeError):
            return False

    def reusable(self, fingerprint: str) -> dict | None:
        rec = self.read()
        return rec if rec is not None and rec.get("fingerprint") == fingerprint and self.intact(rec) else None
