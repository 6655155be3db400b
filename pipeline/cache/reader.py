"""Reading a cache: open and check it, name what it holds, hand out its rows (Ray Dataset, Arrow, pandas)."""

from __future__ import annotations

import hashlib
import posixpath
import time
from dataclasses import dataclass

import numpy as np

from raykd.pipeline.cache import columns as C
from raykd.pipeline.cache.storage import (
    BUILD,
    LOCK,
    MANIFEST,
    REFINED,
    SCHEMA_VERSION,
    VIEWS,
    CacheError,
    marker,
    open_fs,
    owner_alive,
    read_json,
    read_parquet_part,
    storage_errors,
    storage_message,
    view_dir,
)
from raykd.pipeline.core.log import log
from raykd.pipeline.core.records import BuildStarted, LockRecord, Manifest, ViewCommit, check


def column_array(table, name: str) -> np.ndarray:
    """A fixed-shape tensor (or plain) column as one numpy array (rows, *shape)."""
    col = table.column(name).combine_chunks()
    if hasattr(col, "to_numpy_ndarray"):
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False)


def tensor_shape(type_str: str) -> tuple[int, ...] | None:
    """(8, 8, 1) from the manifest's 'tensor<uint8>[8, 8, 1]'; None for a plain column."""
    if not type_str.startswith("tensor<"):
        return None
    return tuple(int(s) for s in type_str[type_str.index("[") + 1:-1].split(",") if s.strip())


@dataclass(frozen=True)
class TargetReader:
    """How a job turns the raw target columns of a batch into {source: logits (B, C) float32}: fp16 logits
    as they are, top-k rebuilt into full distributions (codecs.topk_decode)."""

    columns: dict  # source -> [its logits column] or [its top-k probabilities, indices columns]
    num_classes: int
    temperature: float = 1.0  # of the stored top-k probabilities

    @property
    def all_columns(self) -> list[str]:
        return [c for cols in self.columns.values() for c in cols]

    def __call__(self, raw: dict) -> dict:
        from raykd.pipeline.cache.codecs import topk_decode
        from raykd.pipeline.data.datasets import as_tensor

        out = {}
        for source, cols in self.columns.items():
            if len(cols) == 1:
                out[source] = as_tensor(raw[cols[0]]).float()
            else:
                out[source] = topk_decode(as_tensor(raw[cols[0]]), as_tensor(raw[cols[1]]), self.num_classes,
                                          self.temperature)
        return out


@dataclass(frozen=True)
class PartChecks:
    """What a job checks each part file it reads against: its sha256 in the manifest, by path."""

    uri: str
    root: str
    sha256: dict  # full path -> sha256

    def read(self, fs, path: str, columns: list[str] | None = None):
        return read_parquet_part(fs, path, columns, self.sha256.get(path), self.uri, self.root)


def load_refined(fs, paths: list[str], by_view: bool = False, checks: PartChecks | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The professor's refined targets in `paths`, sorted by key: (keys, refined float32 (N, C)).
    The key is the sample id, or view_id * 2**40 + sample_id with `by_view` (several views)."""
    import pyarrow as pa

    cols = ["sample_id", "view_id", C.REFINED]
    t = pa.concat_tables([checks.read(fs, p, cols) if checks else read_parquet_part(fs, p, cols) for p in paths])
    keys = column_array(t, "sample_id").astype(np.int64)
    if by_view:
        keys = keys + column_array(t, "view_id").astype(np.int64) * (1 << 40)
    order = np.argsort(keys, kind="stable")
    return keys[order], column_array(t, C.REFINED)[order].astype(np.float32)


@dataclass(frozen=True)
class Building:
    """A cache whose build is running (its lock held by a live owner): where a reader waits for a view's
    commit record. The wait ends with a CacheError when the build fails (its error, from `_build.json`) or
    stops (its lock gone, or its owner dead) before committing the view."""

    uri: str
    fs: object
    root: str
    fingerprint: str
    poll_s: float = 0.5

    def state(self) -> dict | None:
        """The build's record while it runs, else None; raises the build's failure."""
        build = read_json(self.fs, posixpath.join(self.root, BUILD), BuildStarted, "unfinished build record")
        if build is not None and build.get("error"):
            raise CacheError(f"{self.uri}: the cache build failed: {build['error']}")
        lock = read_json(self.fs, posixpath.join(self.root, LOCK), LockRecord, "lock")
        if build is None or build.get("fingerprint") != self.fingerprint or lock is None or not owner_alive(lock):
            return None
        return build

    def committed(self, k: int) -> list[dict] | None:
        """View k's part files (path, rows, bytes, sha256) if this build has committed it."""
        rec = read_json(self.fs, marker(self.root, k), ViewCommit, "view commit record")
        return rec["files"] if rec is not None and rec["fingerprint"] == self.fingerprint else None

    def wait(self, k: int) -> list[dict]:
        """View k's part files, once the build has committed it."""
        said = False
        while True:
            self.fs.invalidate_cache()
            if (files := self.committed(k)) is not None:
                return files
            if self.state() is None:
                if (files := self.committed(k)) is not None:  # committed as the build ended
                    return files
                raise CacheError(f"{self.uri}: the cache build stopped before committing view {k} (its lock is gone "
                                 "or its process died); rerun `raykd cache` to finish it")
            if not said:
                log.info(f"[cache] waiting for the build under way to commit view {k}")
                said = True
            time.sleep(self.poll_s)


class ViewFiles(dict):
    """{view: its part files' paths} for the views a job reads. On a cache being built (`building`), a
    view not yet committed is waited for when first asked (`files[k]`): its commit record's files are
    added, with their sha256 added to `checks`."""

    def __init__(self, committed: dict, used: list[int], checks: PartChecks, building: Building | None = None):
        super().__init__(committed)
        self.used, self.checks, self.building = list(used), checks, building

    def __missing__(self, k: int) -> list[str]:
        if self.building is None or k not in self.used:
            raise KeyError(k)
        files = self.building.wait(k)
        paths = [posixpath.join(self.building.root, f["path"]) for f in files]
        self.checks.sha256.update({p: f["sha256"] for p, f in zip(paths, files)})
        self[k] = paths
        return paths


class Cache:
    """An opened, validated cache: its manifest, what it holds, and its rows. `wait`: a cache whose build
    is running opens too, once its first view is committed: `manifest` then lists the views committed so
    far, `building` says where to wait for the others (else None)."""

    def __init__(self, uri: str, s3_endpoint: str | None = None, wait: bool = False):
        self.uri = uri
        self.building: Building | None = None
        self.fs, self.root = open_fs(uri, s3_endpoint)
        try:
            manifest = read_json(self.fs, posixpath.join(self.root, MANIFEST))
            if manifest is None:
                manifest = self._running_build(wait)
        except storage_errors() as e:
            raise CacheError(storage_message(uri, e)) from None
        if manifest is None:
            raise CacheError(f"{uri} is not a cache: no {MANIFEST} (an unfinished build? rerun `raykd cache`)")
        if not isinstance(manifest, dict):
            check(manifest, Manifest, f"{uri}/{MANIFEST}", "cache manifest", CacheError)  # names the shape
        version = manifest.get("schema_version")
        if version == 1:
            raise CacheError(f"{uri} is a cache of raykd's first layout (schema_version 1, its rows beside its JSON "
                             f"files); this raykd reads layout {SCHEMA_VERSION}: rebuild it with `raykd cache --overwrite` "
                             "and the config that built it (its config.resolved.yaml; the teachers are reused, not "
                             "retrained)")
        if version != SCHEMA_VERSION:
            raise CacheError(f"{uri}/{MANIFEST}: schema_version {version!r}, this raykd reads {SCHEMA_VERSION}")
        self.manifest = check(manifest, Manifest, f"{uri}/{MANIFEST}", "cache manifest", CacheError)
        self._check_files()

    def _running_build(self, wait: bool) -> dict | None:
        """The manifest so far of a build under way (None if there is none); waits for its first view."""
        build = read_json(self.fs, posixpath.join(self.root, BUILD), BuildStarted, "unfinished build record")
        if build is None:
            return None
        watch = Building(self.uri, self.fs, self.root, build["fingerprint"])
        if watch.state() is None:
            return None  # an interrupted build: named by the caller
        if not wait:
            raise CacheError(f"{self.uri}: the cache is being built (no {MANIFEST} yet); wait for `raykd cache` to "
                             "finish")
        said = False
        while True:
            self.fs.invalidate_cache()
            state = watch.state()
            manifest = read_json(self.fs, posixpath.join(self.root, MANIFEST))  # after the state: a build that ends
            if manifest is not None:                                            # between the two is seen finished
                return manifest
            if state is None:
                raise CacheError(f"{self.uri}: the cache build stopped before committing a view (its lock is gone or "
                                 "its process died); rerun `raykd cache` to finish it")
            if state.get("manifest"):
                self.building = watch
                return state["manifest"]
            if not said:
                log.info(f"[cache] {self.uri}: waiting for the build under way to commit its first view")
                said = True
            time.sleep(watch.poll_s)

    def committed(self, k: int) -> bool:
        """Whether view k's rows are all there (always, once the build is finished)."""
        return self.building is None or bool(self.view_files(k))

    def view_files_of(self, views: list[int]) -> "ViewFiles":
        """The part files of these views, for a job: those of a cache being built are waited for when read."""
        committed = {k: self.view_files(k) for k in views if self.committed(k)}
        return ViewFiles(committed, views, self.checks([p for ps in committed.values() for p in ps]), self.building)

    # ---- what it holds

    @property
    def teachers(self) -> list[str]:
        return [t["name"] for t in self.manifest["teachers"]]

    @property
    def num_classes(self) -> int:
        return self.manifest["dataset"]["num_classes"]

    @property
    def targets(self) -> dict:
        """{"logits": full fp16 logits stored, "topk": {k, of, temperature} or None}."""
        return self.manifest["targets"]

    @property
    def sources(self) -> list[str]:
        """The names teacher targets come under: the teachers, or `ensemble` when the cache holds only the
        top-k of their mean."""
        t = self.targets
        if t["logits"] or (t["topk"] and t["topk"]["of"] == "teachers"):
            return self.teachers
        return [C.ENSEMBLE]

    def target_columns(self, source: str) -> list[str]:
        """The stored columns of one source's targets: its full logits, else its top-k."""
        if self.targets["logits"] and source in self.teachers:
            return [C.logits(source)]
        if self.targets["topk"] and source in self.sources:
            return list(C.topk(source))
        held = "full logits" if self.targets["logits"] else f"top-{self.targets['topk']['k']} of {self.sources}"
        raise CacheError(f"{self.uri}: no targets of {source!r} in the cache (it holds {held}); pick among "
                         f"{self.sources} (method.teachers), or build a cache with them")

    def checks(self, paths: list[str]) -> PartChecks:
        """The manifest's sha256 of these part files, for a job to check them as it reads them."""
        by_path = {posixpath.join(self.root, f["path"]): f["sha256"] for f in self.all_files}
        return PartChecks(self.uri, self.root, {p: by_path[p] for p in paths})

    def target_reader(self, sources: list[str] | None = None) -> TargetReader:
        """The reader of these sources' targets (default: all)."""
        tk = self.targets["topk"]
        return TargetReader({s: self.target_columns(s) for s in sources or self.sources}, self.num_classes,
                            tk["temperature"] if tk else 1.0)

    def expect(self, teachers: list[str] | None = None, views: int | None = None,
               columns: list[str] | None = None, data_fingerprint: str | None = None) -> "Cache":
        """Refuse a cache that is not what the caller needs, naming what differs."""
        m = self.manifest
        missing = [t for t in teachers or [] if t not in self.teachers and t not in self.sources]
        if missing:
            raise CacheError(f"{self.uri}: no teacher {missing[0]!r} in the cache (cached teachers: {self.teachers}); "
                             f"build a cache with it (cache.teachers) or pick cached ones (method.teachers)")
        if views is not None and views != m["views"]:
            raise CacheError(f"{self.uri}: the cache has K={m['views']} views, expected {views}")
        missing = [c for c in columns or [] if c not in m["columns"]]
        if missing:
            col = C.parse(missing[0])
            if missing[0] == C.REFINED:
                how = "run `raykd professor` on it"
            elif col.kind == "feat":
                how = (f"add `cache.layers: {{{col.source}: [{col.stage}]}}` and rebuild it (`raykd cache --overwrite`), "
                       f"or distil with the teachers online (distill.teachers=online)")
            else:
                how = "rebuild it with what adds it"
            raise CacheError(f"{self.uri}: no column {missing[0]!r} in the cache; {how}")
        if data_fingerprint is not None and data_fingerprint != m["dataset"]["fingerprint"]:
            raise CacheError(f"{self.uri}: built from other data (dataset fingerprint differs)")
        return self

    # ---- integrity

    @property
    def all_files(self) -> list[dict]:
        """Every file the manifest lists: the teachers' rows, then the professor's (if any)."""
        return [*self.manifest["files"], *(self.manifest.get("professor") or {}).get("files", [])]

    def _check_files(self) -> None:
        """The cheap check on open: every listed file exists with its recorded size; nothing unlisted."""
        listed = {f["path"]: f for f in self.all_files}
        for path, f in listed.items():
            full = posixpath.join(self.root, path)
            try:
                size = self.fs.size(full)
            except FileNotFoundError:
                raise CacheError(f"{self.uri}: part file {path} is missing (listed in {MANIFEST})") from None
            if size != f["bytes"]:
                raise CacheError(f"{self.uri}: part file {path} has {size} bytes, {MANIFEST} says {f['bytes']}")
        roots = [VIEWS] + ([REFINED] if self.manifest.get("professor") else [])  # else refined/ is a leftover
        for data_root in roots if self.building is None else []:  # a build under way writes views not yet listed
            folder = posixpath.join(self.root, data_root)
            present = {posixpath.relpath(p, self.root) for p in self.fs.find(folder)} if self.fs.exists(folder) else set()
            stray = sorted(present - set(listed))
            if stray:
                raise CacheError(f"{self.uri}: {stray[0]} is not listed in {MANIFEST} (a stray or foreign file)")

    def verify(self) -> None:
        """The full check: every part file's sha256 and row count against the manifest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for f in self.all_files:
            with self.fs.open(posixpath.join(self.root, f["path"]), "rb") as fh:
                data = fh.read()
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise CacheError(f"{self.uri}: part file {f['path']} does not match its sha256 in {MANIFEST} (corrupt)")
            try:
                rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            except pa.ArrowException as e:
                raise CacheError(f"{self.uri}: part file {f['path']} is not readable Parquet ({e})") from None
            if rows != f["rows"]:
                raise CacheError(f"{self.uri}: part file {f['path']} has {rows} rows, {MANIFEST} says {f['rows']}")

    def column_bytes(self) -> dict[str, int]:
        """Compressed bytes per column over every listed file, from the Parquet footers."""
        import pyarrow.parquet as pq

        per_col: dict[str, int] = {}
        for f in self.all_files:
            with self.fs.open(posixpath.join(self.root, f["path"]), "rb") as fh:
                md = pq.ParquetFile(fh).metadata
            for rg in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(rg).column(c)
                    name = col.path_in_schema.split(".list")[0].split(".element")[0]
                    per_col[name] = per_col.get(name, 0) + col.total_compressed_size
        return per_col

    # ---- rows

    def view_files(self, k: int) -> list[str]:
        if not 0 <= k < self.manifest["views"]:
            raise CacheError(f"{self.uri}: no view {k} (K={self.manifest['views']})")
        prefix = posixpath.relpath(view_dir(self.root, k), self.root) + "/"
        return [posixpath.join(self.root, f["path"]) for f in self.manifest["files"] if f["path"].startswith(prefix)]

    def refined_files(self, k: int) -> list[str]:
        """The professor's files of view k (the `refined` column, keyed by sample_id)."""
        prof = self.manifest.get("professor")
        if not prof:
            raise CacheError(f"{self.uri}: no refined column: run `raykd professor` on this cache first")
        prefix = posixpath.relpath(view_dir(self.root, k, REFINED), self.root) + "/"
        return [posixpath.join(self.root, f["path"]) for f in prof["files"] if f["path"].startswith(prefix)]

    def view_dataset(self, k: int, columns: list[str] | None = None):
        """A Ray Dataset of view partition k (one epoch's worth of rows), optionally only some columns."""
        import ray

        ds = ray.data.read_parquet(self.view_files(k), filesystem=self.fs)
        return ds.select_columns(columns) if columns else ds

    def read_table(self, columns: list[str] | None = None, views: list[int] | None = None):
        """Teacher rows of some views (all by default) as one Arrow table, with pyarrow (no Ray)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for k in views if views is not None else range(self.manifest["views"]):
            for path in self.view_files(k):
                with self.fs.open(path, "rb") as f:
                    tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)

    def view(self, k: int, columns: list[str] | None = None, format: str = "arrow"):
        """View k's teacher rows: an Arrow table (tensor columns as Arrow's fixed-shape tensors), or a pandas
        DataFrame whose tensor cells are numpy arrays of their shape (`format="pandas"`)."""
        table = self.read_table(columns, views=[k])
        if format == "arrow":
            return table
        if format != "pandas":
            raise ValueError(f"format must be 'arrow' or 'pandas', not {format!r}")
        import pandas as pd

        data = {}
        for name in table.column_names:
            shape = tensor_shape(self.manifest["columns"].get(name, ""))
            values = column_array(table, name)
            data[name] = list(values) if shape is not None else values
        return pd.DataFrame(data)
