"""Where a cache lives: any fsspec URL (a local path, s3://...), JSON written whole or not at all, part
files described by size and sha256, and the build lock."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid

from raykd.pipeline.core.errors import ConfigError, RaykdError
from raykd.pipeline.core.records import LockRecord, check
from raykd.pipeline.core.schema import check_endpoint

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
VIEWS, REFINED = "views", "refined"  # the data roots: the teachers' rows, the professor's rows
LOCK = "_build.lock"  # held while a build runs: its owner and heartbeat
BUILD = "_build.json"  # an unfinished build: its fingerprint (a rerun with the same inputs resumes it)
HEARTBEAT_S, STALE_S = 10.0, 60.0


def view_dir(root: str, k: int, data_root: str = VIEWS) -> str:
    """The Hive partition of view k under a data root: <root>/views/view=k (or refined/view=k)."""
    return posixpath.join(root, data_root, f"view={k}")


def marker(root: str, k: int) -> str:
    """View k's commit record."""
    return posixpath.join(root, "_views", f"view={k}.json")


class CacheError(RaykdError):
    """A cache is missing, corrupt, or not the cache the caller expects."""


class CacheDamage(CacheError):
    """A cache file that does not match its manifest when a job reads it."""


def damage_message(uri: str, rel: str, what: str) -> str:
    """One line for a damaged part file: which one, and the commands that list and repair the damage."""
    m = re.search(r"^(views|refined)/view=(\d+)/", rel)
    repair = ("rebuilds the views they belong to (view " + m.group(2) + " here) and keeps the others"
              if m and m.group(1) == VIEWS else "drops the refined column, which `raykd professor` then adds again")
    return (f"{uri}: part file {rel} {what}: it was damaged after the cache was built. `raykd inspect --verify {uri}` "
            f"lists every damaged file; `raykd cache --repair -c CONFIG` {repair}. Nothing was deleted")


def read_part(fs, path: str, sha256: str | None = None, uri: str = "", root: str = "") -> bytes:
    """A part file's bytes, checked against its sha256 in the manifest when one is given."""
    with fs.open(path, "rb") as f:
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CacheDamage(damage_message(uri, posixpath.relpath(path, root) if root else path,
                                         "does not match its sha256 in manifest.json"))
    return data


def read_parquet_part(fs, path: str, columns: list[str] | None = None, sha256: str | None = None, uri: str = "",
                      root: str = ""):
    """A part file as an Arrow table, its bytes checked first; unreadable Parquet is named as damage too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_part(fs, path, sha256, uri, root)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except pa.ArrowException as e:
        raise CacheDamage(damage_message(uri, posixpath.relpath(path, root) if root else path,
                                         f"is not readable Parquet ({str(e)[:200]})")) from None


def open_fs(uri: str, s3_endpoint: str | None = None):
    """(fsspec filesystem, root path without protocol) for a local path or URL. Credentials come from the
    environment (AWS_ACCESS_KEY_ID, ...) or the usual AWS files; they are never logged or stored."""
    import fsspec

    opts = {}
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not s3_endpoint:
        try:
            check_endpoint(endpoint)
        except ValueError as e:
            raise ConfigError(f"AWS_ENDPOINT_URL: {e}") from None
    if uri.startswith(("s3://", "s3a://")) and endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        fs, root = fsspec.core.url_to_fs(uri, **opts)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"cache.uri={uri}: cannot open this storage ({e})") from None
    fs.invalidate_cache()  # fsspec reuses client instances: never trust listings cached before other processes wrote
    return fs, root.rstrip("/")


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def storage_errors() -> tuple[type[BaseException], ...]:
    """What reaching a store can raise: OSError (local, and most of s3fs), botocore's own (no credentials,
    endpoint down) which s3fs lets through."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def storage_message(uri: str, e: BaseException) -> str:
    if e.__class__.__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or use an instance role)")
    return f"{uri}: storage not reachable ({e.__class__.__name__}: {str(e)[:300]})"


def read_json(fs, path: str, schema=None, kind: str = "") -> dict | None:
    """A JSON file of the store (None if missing), checked against `schema` (raykd.pipeline.core.records) when given."""
    try:
        with fs.open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, bad UTF-8
        raise CacheError(f"{path} is not valid JSON ({e}): the cache is corrupt") from None
    return obj if schema is None else check(obj, schema, path, kind, CacheError)


def write_json(fs, path: str, obj: dict) -> None:
    """Write whole or not at all: a temporary name, then a move (a rename on local disk)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.mv(tmp, path)


def create_json(fs, path: str, obj: dict) -> bool:
    """Create `path`, whole, only if it does not exist, atomically: on local disk a hard link of a written
    temporary file (link(2) fails on an existing name, and readers never see a half-written file), on S3 a
    conditional PUT (`If-None-Match: *`). False when it exists."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    try:
        if is_local(fs):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            finally:
                os.remove(tmp)
        else:
            with fs.open(path, "xb") as f:
                f.write(data)
        return True
    except FileExistsError:
        return False


def describe_files(fs, root: str, folder: str) -> list[dict]:
    """Every Parquet file under `folder`: path relative to `root`, rows, bytes, sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for path in sorted(p for p in fs.find(folder) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            data = f.read()
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        files.append({"path": posixpath.relpath(path, root), "rows": rows, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    return files


def files_present(fs, root: str, files: list[dict]) -> bool:
    try:
        return all(fs.size(posixpath.join(root, f["path"])) == f["bytes"] for f in files)
    except FileNotFoundError:
        return False


def owner_alive(rec: dict) -> bool:
    """A lock's owner is alive while its heartbeat is younger than STALE_S, unless it is a process of this
    machine that no longer exists (a build killed here is taken over at once, one elsewhere after STALE_S)."""
    o = rec.get("owner") or {}
    if o.get("host") == socket.gethostname():
        try:
            os.kill(int(o["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            pass  # alive (another user's), or a record without a pid: go by the heartbeat
    return time.time() - rec.get("heartbeat", 0) < STALE_S


class Lock:
    """The right to write one output (a cache, a student's folder, ...): a lock file, created atomically
    (`create_json`: link(2) on local disk, a conditional PUT `If-None-Match: *` on S3), so that of two
    writers only one goes on, however their writes interleave.
    It names its owner and carries a heartbeat the owner refreshes every HEARTBEAT_S; it is removed when
    the work ends. A lock whose owner died is taken over: one taker only, by first creating a marker named
    after that lock's token (atomically too). On a store that ignores conditional writes, a read-back after
    `settle_s` still catches most collisions (see the README)."""

    def __init__(self, fs, root: str, uri: str, settle_s: float = 1.0, name: str = LOCK,
                 what: str = "build of this cache", then: str = "it is reused then"):
        self.fs, self.path, self.uri = fs, posixpath.join(root, name), uri
        self.name, self.what, self.then = name, what, then
        self.settle_s = 0.0 if is_local(fs) else settle_s
        self.rec = {"token": uuid.uuid4().hex, "started": time.time(),
                    "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.lost = False

    def _refuse(self, other: dict) -> CacheError:
        o = other.get("owner") or {}
        age = time.time() - other.get("heartbeat", 0)
        return CacheError(f"{self.uri}: another {self.what} is running (pid {o.get('pid')} on {o.get('host')}, "
                          f"last heartbeat {age:.0f}s ago); wait for it to finish, {self.then}")

    def _read(self) -> dict | None:
        return read_json(self.fs, self.path, LockRecord, "lock")

    def _take(self) -> None:
        for _ in range(3):
            if create_json(self.fs, self.path, {**self.rec, "heartbeat": time.time()}):
                return
            other = self._read()
            if other is None:  # released meanwhile: try again
                continue
            if owner_alive(other):
                raise self._refuse(other)
            marker = f"{self.path}.{other.get('token', 'none')}"  # the dead owner's lock: one taker only
            if not create_json(self.fs, marker, self.rec):
                raise CacheError(f"{self.uri}: another process is taking over the lock of a {self.what} that died "
                                 f"({posixpath.basename(marker)}); if none is running, remove {self.name}* there")
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            ok = create_json(self.fs, self.path, {**self.rec, "heartbeat": time.time()})
            self.fs.rm(marker)
            if ok:
                return
        raise CacheError(f"{self.uri}: could not take the lock {self.name} (it keeps changing hands)")

    def check(self) -> None:
        """Still ours? (A store without conditional writes, or an owner silent for STALE_S, can lose it.)"""
        now = self._read() or {}
        if now.get("token") != self.rec["token"]:
            self.lost = True
            raise CacheError(f"{self.uri}: another process took the lock of this {self.what} (pid "
                             f"{(now.get('owner') or {}).get('pid')}); this one stops, nothing it wrote is committed")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                now = self._read() or {}
                if now.get("token") != self.rec["token"]:
                    self.lost = True
                    return
                write_json(self.fs, self.path, {**self.rec, "heartbeat": time.time()})
            except Exception:  # storage hiccup: the next beat tries again
                pass

    def __enter__(self):
        self._take()
        if self.settle_s:
            time.sleep(self.settle_s)
            self.fs.invalidate_cache()
            try:
                self.check()
            except CacheError:
                raise CacheError(f"{self.uri}: another {self.what} started at the same time; it goes on, "
                                 "this one stops") from None
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not self.lost:
            try:
                if (self._read() or {}).get("token") == self.rec["token"]:
                    self.fs.rm(self.path)
            except FileNotFoundError:
                pass


class BuildLock(Lock):
    """The right to build one cache: `_build.lock` at its root."""
