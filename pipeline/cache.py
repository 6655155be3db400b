"""`raykd cache`: run every teacher once over K views of every training sample into a Parquet cache.

Layout under the cache URI (a local path or any fsspec URL, e.g. s3://bucket/prefix):

    view=0/part-*.parquet ... view=K-1/part-*.parquet   one Hive partition per view
    _views/view=k.json                                  per-view commit record (files, rows, bytes, sha256)
    config.resolved.yaml                                the resolved config of the run that built it
    _build.json                                         the build in progress: fingerprint, owner, heartbeat
    manifest.json                                       written last: the commit marker of the cache

The missing views are built by one Ray Data pipeline per pass (`cache.views_per_pass`; default all,
so the actor pools start once): render the views (sample id, view id -> record + pixels), then one
`map_batches` stage per teacher on its own actor pool (model loaded once per actor, batched `no_grad`
inference), each adding its columns, then `write_parquet` straight into the view partitions; each
view is then committed by its record under `_views/`. A rerun after a crash keeps committed views,
clears the partitions of uncommitted ones and redoes them, so every (sample_id, view_id) row exists
exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time
import uuid

import numpy as np
import torch

from pipeline.checkpoints import read_verified
from pipeline.config import Config
from pipeline.errors import ConfigError, RaykdError
from pipeline.progress import ProgressPrinter, emit
from pipeline.views import ViewPolicy, apply_views, view_params

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(RaykdError):
    """A cache is missing, corrupt, or not the cache the caller expects."""


# --------------------------------------------------------------------------------------------------
# storage


def cache_uri(cfg: Config) -> str:
    return cfg.cache.uri or os.path.join(os.path.abspath(cfg.run.out_dir), "cache")


def open_fs(uri: str, s3_endpoint: str | None = None):
    """(fsspec filesystem, root path without protocol) for a local path or URL. Credentials come from the
    environment (AWS_ACCESS_KEY_ID, ...) or the usual AWS files; they are never logged or stored."""
    import fsspec

    opts = {}
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith(("s3://", "s3a://")) and endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        fs, root = fsspec.core.url_to_fs(uri, **opts)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"cache.uri={uri}: cannot open this storage ({e})") from None
    fs.invalidate_cache()  # fsspec reuses client instances: never trust listings cached before other processes wrote
    return fs, root.rstrip("/")


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


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}): the cache is corrupt") from None


def write_json(fs, path: str, obj: dict) -> None:
    """Write whole or not at all: a temporary name, then a move (a rename on local disk)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
    fs.mv(tmp, path)


# --------------------------------------------------------------------------------------------------
# the Ray Data stages


def split_to_ray(split, rows_per_block: int = 4096):
    """A split as a Ray Dataset of rows {sample_id, label, image (H, W, C) uint8 tensor}."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    tables = []
    for s in range(0, len(split), rows_per_block):
        e = s + rows_per_block
        tables.append(pa.table({
            "sample_id": pa.array(split.ids[s:e]),
            "label": pa.array(split.labels[s:e]),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.images[s:e])),
        }))
    return ray.data.from_arrow(tables)


def render_views(batch: dict, view_ids: list[int], data_seed: int, pad: int, flip: bool) -> dict:
    """Stage 1: source rows -> one row per (sample, view): the view record and its pixels.
    A pure function of (seed, sample id, view id); `view` is the Hive partition key (= view_id)."""
    ids = np.tile(batch["sample_id"].astype(np.int64), len(view_ids))
    vids = np.repeat(np.asarray(view_ids, dtype=np.int32), len(batch["sample_id"]))
    images = np.concatenate([batch["image"]] * len(view_ids))
    rec = view_params(data_seed, ids, vids, ViewPolicy(pad=pad, flip=flip))
    return {
        "sample_id": ids,
        "view_id": vids,
        "view": vids.copy(),
        "label": np.tile(batch["label"].astype(np.int64), len(view_ids)),
        "view_ox": rec["ox"], "view_oy": rec["oy"], "view_flip": rec["flip"],
        "pixels": apply_views(images, rec["ox"], rec["oy"], rec["flip"], pad),
    }


class TeacherForward:
    """Stage 2..N+1, one actor pool per teacher: loads the model once, adds this teacher's columns."""

    def __init__(self, name: str, arch: str, ckpt_path: str, weights: bytes, num_classes: int, in_chans: int,
                 mean, std, layers: list[str], feat_dtype: str, topk: int | None, device: str,
                 threads: int | None, progress=None):
        from pipeline.checkpoints import load_into, state_from_bytes
        from pipeline.models import build_model

        if threads:  # else Ray's default: as many as the actor's CPUs
            torch.set_num_threads(threads)
        self.name, self.layers, self.feat_dtype, self.topk, self.progress = name, layers, feat_dtype, topk, progress
        self.mean, self.std = mean, std
        self.device = torch.device(device)
        self.model = build_model(arch, num_classes, in_chans)
        load_into(self.model, state_from_bytes(weights, ckpt_path), ckpt_path, arch)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from pipeline.data import as_tensor, normalize

        x = normalize(as_tensor(batch["pixels"]).to(self.device), self.mean, self.std)
        logits, stages = self.model.forward_stages(x)
        out = dict(batch)
        out[f"logits.{self.name}"] = logits.half().cpu().numpy()
        if self.topk:
            val, idx = logits.topk(self.topk, dim=1)
            out[f"topk.{self.name}.values"] = val.half().cpu().numpy()
            out[f"topk.{self.name}.indices"] = idx.to(torch.int16 if logits.shape[1] < 32768 else torch.int32).cpu().numpy()
        for layer in self.layers:
            fmap = stages[layer].float()
            col = f"feat.{self.name}.{layer}"
            if self.feat_dtype == "int8":
                q, scale = quantize_int8(fmap)
                out[col], out[col + ".scale"] = q.cpu().numpy(), scale.cpu().numpy()
            else:
                out[col] = fmap.half().cpu().numpy()
        emit(self.progress, (self.name, len(x)))
        return out


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round(x / s), s = max|x| / 127 over the row's whole map."""
    flat = x.reshape(len(x), -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale.float()


def dequantize_int8(q, scale) -> torch.Tensor:
    q = torch.as_tensor(q)
    return q.float() * torch.as_tensor(scale, dtype=torch.float32).reshape(-1, *([1] * (q.dim() - 1)))


# --------------------------------------------------------------------------------------------------
# build


def _teacher_entries(cfg: Config, out_dir: str, splits) -> list[dict]:
    from pipeline.teachers import load_teacher, teacher_dir

    names = cfg.cache.teachers or [t.name for t in cfg.teachers.models]
    entries = []
    for name in names:
        model, rec = load_teacher(out_dir, name, for_cache=True)  # verifies sha256 and the accuracy gate
        if rec["data_fingerprint"] != splits.fingerprint:
            raise CacheError(f"teacher {name!r} was trained on other data (data fingerprint differs): rerun `raykd teachers`")
        layers = cfg.cache.layers.get(name, [])
        missing = [ly for ly in layers if ly not in model.stage_names]
        if missing:
            raise ConfigError(f"cache.layers.{name}: {missing} are not stages of {rec['arch']} "
                              f"(stages: {', '.join(model.stage_names)})")
        shapes = model.stage_shapes(splits.image_size)
        entries.append({
            "name": name, "arch": rec["arch"], "checkpoint_sha256": rec["best"]["sha256"],
            "checkpoint": os.path.join(teacher_dir(out_dir, name), rec["best"]["file"]),
            "val_acc": rec["val_acc"], "test_acc": rec["test_acc"],
            "layers": {ly: list(shapes[ly]) for ly in layers},
        })
    return entries


def cache_fingerprint(splits, cfg: Config, teachers: list[dict]) -> str:
    c = cfg.cache
    payload = {
        "schema": SCHEMA_VERSION, "data": splits.fingerprint, "data_seed": cfg.data.seed,
        "policy": splits.policy.as_dict(), "views": c.views, "store_views": c.store_views, "topk": c.topk,
        "feat_dtype": c.feat_dtype,
        "teachers": [{k: t[k] for k in ("name", "arch", "checkpoint_sha256", "layers")} for t in teachers],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_cache(cfg: Config, overwrite: bool = False) -> dict:
    """Build (or finish, or reuse) the cache for `cfg`; returns its manifest."""
    from pipeline.data import load_splits

    splits = load_splits(cfg.data)
    out = os.path.abspath(cfg.run.out_dir)
    teachers = _teacher_entries(cfg, out, splits)
    fp = cache_fingerprint(splits, cfg, teachers)
    uri = cache_uri(cfg)
    fs, root = open_fs(uri, cfg.cache.s3_endpoint)
    try:
        manifest = _read_json(fs, posixpath.join(root, MANIFEST))
        building = _read_json(fs, posixpath.join(root, "_build.json"))
    except storage_errors() as e:
        raise CacheError(storage_message(f"cache.uri={uri}", e)) from None
    if manifest is not None and manifest.get("fingerprint") == fp and not overwrite:
        print(f"[cache] {uri}: up to date (fingerprint {fp[:12]}), reused", flush=True)
        return manifest
    other = manifest or building
    if other is not None and other.get("fingerprint") != fp:
        if not overwrite:
            what = "a finished cache" if manifest else "an unfinished build"
            raise CacheError(
                f"{uri} holds {what} of other inputs (fingerprint {other.get('fingerprint', '?')[:12]}, "
                f"this config {fp[:12]}): use another cache.uri, or --overwrite to replace it")
    _refuse_if_running(uri, building)
    if overwrite and fs.exists(root):
        print(f"[cache] --overwrite: removing {uri}", flush=True)
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    with BuildLock(fs, root, uri, fp):
        return _build_views(cfg, splits, teachers, fp, uri, fs, root)


HEARTBEAT_S, STALE_S = 10.0, 60.0


def _refuse_if_running(uri: str, building: dict | None) -> None:
    """Refuse to touch a cache another live build is writing. A build is live while its `_build.json`
    heartbeat is younger than STALE_S, unless its owner is a process of this machine that no longer exists
    (a killed build on this machine is resumed at once; one on another machine after STALE_S)."""
    import socket

    if not building or "owner" not in building:
        return
    o = building["owner"]
    if o["host"] == socket.gethostname():
        try:
            os.kill(o["pid"], 0)
        except ProcessLookupError:
            return  # died: resume its build
        except PermissionError:
            pass  # alive, another user's
    age = time.time() - building.get("heartbeat", 0)
    if age < STALE_S:
        raise CacheError(f"{uri}: another build of this cache is running (pid {o['pid']} on {o['host']}, "
                         f"last heartbeat {age:.0f}s ago); wait for it to finish, it is reused then")


class BuildLock:
    """`_build.json` as an owner record with a heartbeat while this process builds the cache. Taken by
    writing it, then reading it back after a pause: of two builds starting together, the last writer
    wins and the other refuses (storage with read-after-write consistency: local disk, S3)."""

    def __init__(self, fs, root: str, uri: str, fp: str, settle_s: float = 1.0):
        import socket
        import threading

        self.fs, self.path, self.uri, self.settle_s = fs, posixpath.join(root, "_build.json"), uri, settle_s
        self.rec = {"fingerprint": fp, "started": time.time(), "token": uuid.uuid4().hex,
                    "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self) -> None:
        write_json(self.fs, self.path, {**self.rec, "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # storage hiccup: the next beat tries again
                pass

    def __enter__(self):
        self._write()
        time.sleep(self.settle_s)
        self.fs.invalidate_cache()
        now = _read_json(self.fs, self.path) or {}
        if now.get("token") != self.rec["token"]:
            raise CacheError(f"{self.uri}: another build of this cache started at the same time "
                             f"(pid {now.get('owner', {}).get('pid')}); it goes on, this one stops")
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc_type is None:
            self.fs.rm(self.path)
        else:  # failed: an unfinished build of this fingerprint, owned by nobody (a rerun resumes it)
            write_json(self.fs, self.path, {k: v for k, v in self.rec.items() if k != "owner"})


def _build_views(cfg, splits, teachers, fp, uri, fs, root) -> dict:
    import ray

    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat  # the enum's only home in 2.60

    from pipeline.raysetup import init_ray, local_thread_share, resolve_device

    c = cfg.cache
    init_ray(cfg.ray)
    device = resolve_device(cfg.run.device)
    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE  # pyarrow-native tensors
    ctx.enable_progress_bars = sys.stderr.isatty()  # Ray Data's bars in a terminal; our count lines anywhere
    # By default every actor may use all the node's cores, and the OS shares them: a stage waiting for
    # its input leaves its cores to the others. On 2 cores with 3 teachers this built views 14-19 % faster
    # than one thread per actor (cores split evenly), whose slowest teacher held everyone back.
    threads = c.threads_per_actor or local_thread_share(cfg.ray, 1)
    t_start = time.time()
    views_meta, todo = {}, []
    for k in range(c.views):
        done = _read_json(fs, _marker(root, k))
        if done is not None and done.get("fingerprint") == fp and _files_present(fs, root, done["files"]):
            views_meta[k] = done
        else:
            todo.append(k)
    if views_meta:
        print(f"[cache] views {sorted(views_meta)} already committed, kept", flush=True)
    per_pass = c.views_per_pass or len(todo) or 1
    for group in [todo[i:i + per_pass] for i in range(0, len(todo), per_pass)]:
        t0 = time.time()
        print(f"[cache] views {group}: {len(splits.train)} samples x {len(group)} views x {len(teachers)} teachers "
              f"({', '.join(t['name'] for t in teachers)})", flush=True)
        for k in group:  # what a killed run left in these partitions was never committed
            if fs.exists(_marker(root, k)):
                fs.rm(_marker(root, k))
            if fs.exists(posixpath.join(root, f"view={k}")):
                fs.rm(posixpath.join(root, f"view={k}"), recursive=True)
        progress = ProgressPrinter(totals={t["name"]: len(splits.train) * len(group) for t in teachers},
                                   prefix=f"[cache] views {group}: ")
        ds = split_to_ray(splits.train, rows_per_block=max(c.batch_size, 1024)).map_batches(
            render_views, batch_format="numpy", batch_size=c.batch_size,
            fn_kwargs={"view_ids": group, "data_seed": cfg.data.seed, "pad": splits.policy.pad,
                       "flip": splits.policy.flip})
        for t in teachers:
            res = {"num_gpus": c.gpus_per_actor} if device == "cuda" else {}
            ds = ds.map_batches(
                TeacherForward, batch_format="numpy", batch_size=c.batch_size,
                compute=ray.data.ActorPoolStrategy(size=c.actors(t["name"])), num_cpus=c.cpus_per_actor, **res,
                fn_constructor_kwargs={
                    "name": t["name"], "arch": t["arch"], "ckpt_path": t["checkpoint"],
                    "weights": read_verified(t["checkpoint"], t["checkpoint_sha256"]), "num_classes": splits.num_classes,
                    "in_chans": splits.in_chans, "mean": splits.mean, "std": splits.std,
                    "layers": list(t["layers"]), "feat_dtype": c.feat_dtype, "topk": c.topk, "device": device,
                    "threads": threads, "progress": progress.queue,
                })
        if not c.store_views:
            ds = ds.drop_columns(["pixels"])
        # Straight into the view=k partitions (file names are unique per write): no move, which on S3
        # would be a copy of everything. A view counts only once its record under _views/ is written.
        # A write task gathers about rows_per_file rows of each view of the pass before writing, so files
        # are few and large while the compute stages stay fine-grained. (Ray marks min_rows_per_file with
        # partition_cols deprecated after Feb 2027; Ray is pinned to 2.60 here.)
        with progress:
            ds.write_parquet(root, filesystem=fs, partition_cols=["view"], min_rows_per_file=c.rows_per_file * len(group),
                             compression="zstd")
        fs.invalidate_cache()  # other processes wrote: drop this client's cached listings
        for k in group:  # commit view by view
            files = describe_files(fs, root, posixpath.join(root, f"view={k}"))
            rows = sum(f["rows"] for f in files)
            if rows != len(splits.train):
                raise CacheError(f"view {k}: wrote {rows} rows, expected {len(splits.train)}; not committed")
            views_meta[k] = {"fingerprint": fp, "view": k, "files": files, "rows": rows}
            write_json(fs, _marker(root, k), views_meta[k])
        print(f"[cache] views {group}: committed in {time.time() - t0:.1f}s", flush=True)
    from pipeline.config import dump_config

    with fs.open(posixpath.join(root, "config.resolved.yaml"), "wb") as f:  # the config that built it
        f.write(dump_config(cfg).encode())
    manifest = _manifest(cfg, splits, teachers, fp, fs, root, views_meta, time.time() - t_start)
    write_json(fs, posixpath.join(root, MANIFEST), manifest)  # last: the commit marker (BuildLock drops _build.json)
    print(f"[cache] {uri}: {manifest['rows']} rows, {manifest['bytes'] / 2**20:.1f} MiB, manifest written", flush=True)
    return _read_json(fs, posixpath.join(root, MANIFEST))  # as every later reader will see it


def _marker(root: str, k: int) -> str:
    return posixpath.join(root, "_views", f"view={k}.json")


def _type_str(t) -> str:
    """'tensor<halffloat>[10]' for Arrow's fixed-shape tensors, Arrow's own name otherwise."""
    if hasattr(t, "value_type") and hasattr(t, "shape"):
        return f"tensor<{t.value_type}>{list(t.shape)}"
    return str(t)


def describe_files(fs, root: str, folder: str) -> list[dict]:
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


def _files_present(fs, root: str, files: list[dict]) -> bool:
    try:
        return all(fs.size(posixpath.join(root, f["path"])) == f["bytes"] for f in files)
    except FileNotFoundError:
        return False


def _manifest(cfg, splits, teachers, fp, fs, root, views_meta, seconds) -> dict:
    import pyarrow.parquet as pq

    first = posixpath.join(root, views_meta[0]["files"][0]["path"])
    with fs.open(first, "rb") as f:
        schema = pq.read_schema(f)
    files = [f for k in sorted(views_meta) for f in views_meta[k]["files"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 2),
        "dataset": {"name": splits.name, "fingerprint": splits.fingerprint, "seed": cfg.data.seed,
                    "num_classes": splits.num_classes, "image_shape": list(splits.train.images.shape[1:]),
                    "train_samples": len(splits.train), "mean": splits.mean, "std": splits.std},
        "views": cfg.cache.views,
        "policy": splits.policy.as_dict(),
        "store_views": cfg.cache.store_views,
        "topk": cfg.cache.topk,
        "feat_dtype": cfg.cache.feat_dtype,
        "teachers": [{k: t[k] for k in ("name", "arch", "checkpoint_sha256", "val_acc", "test_acc", "layers")}
                     for t in teachers],
        "columns": {field.name: _type_str(field.type) for field in schema},
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
    }


# --------------------------------------------------------------------------------------------------
# read


class Cache:
    """An opened, validated cache: its manifest and Ray Datasets of its view partitions."""

    def __init__(self, uri: str, s3_endpoint: str | None = None):
        self.uri = uri
        self.fs, self.root = open_fs(uri, s3_endpoint)
        try:
            manifest = _read_json(self.fs, posixpath.join(self.root, MANIFEST))
        except storage_errors() as e:
            raise CacheError(storage_message(uri, e)) from None
        if manifest is None:
            raise CacheError(f"{uri} is not a cache: no {MANIFEST} (an unfinished build? rerun `raykd cache`)")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{uri}/{MANIFEST}: schema_version {manifest.get('schema_version')!r}, "
                             f"this raykd reads {SCHEMA_VERSION}")
        self.manifest = manifest
        self._check_files()

    @property
    def all_files(self) -> list[dict]:
        """Every file the manifest lists: the view partitions', then the professor's (if any)."""
        return [*self.manifest["files"], *(self.manifest.get("professor") or {}).get("files", [])]

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
        folders = [f"view={k}" for k in range(self.manifest["views"])]
        if self.manifest.get("professor"):  # without an entry, professor/ is an uncommitted leftover: ignored
            folders += [f"professor/view={k}" for k in range(self.manifest["views"])]
        for sub in folders:
            folder = posixpath.join(self.root, sub)
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

    @property
    def teachers(self) -> list[str]:
        return [t["name"] for t in self.manifest["teachers"]]

    def expect(self, teachers: list[str] | None = None, views: int | None = None,
               columns: list[str] | None = None, data_fingerprint: str | None = None) -> "Cache":
        """Refuse a cache that is not what the caller needs, naming what differs."""
        m = self.manifest
        missing = [t for t in teachers or [] if t not in self.teachers]
        if missing:
            raise CacheError(f"{self.uri}: no teacher {missing[0]!r} in the cache (cached teachers: {self.teachers}); "
                             f"build a cache with it (cache.teachers) or pick cached ones (method.teachers)")
        if views is not None and views != m["views"]:
            raise CacheError(f"{self.uri}: the cache has K={m['views']} views, expected {views}")
        missing = [c for c in columns or [] if c not in m["columns"]]
        if missing:
            if missing[0] == "refined":
                how = "run `raykd professor` on it"
            elif missing[0].startswith("feat."):
                _, t, stage = missing[0].split(".", 2)
                how = (f"add `cache.layers: {{{t}: [{stage}]}}` and rebuild it (`raykd cache --overwrite`), "
                       f"or distil with the teachers online (distill.teachers=online)")
            else:
                how = "rebuild it with what adds it"
            raise CacheError(f"{self.uri}: no column {missing[0]!r} in the cache; {how}")
        if data_fingerprint is not None and data_fingerprint != m["dataset"]["fingerprint"]:
            raise CacheError(f"{self.uri}: built from other data (dataset fingerprint differs)")
        return self

    def view_files(self, k: int) -> list[str]:
        if not 0 <= k < self.manifest["views"]:
            raise CacheError(f"{self.uri}: no view {k} (K={self.manifest['views']})")
        return [posixpath.join(self.root, f["path"]) for f in self.manifest["files"]
                if f["path"].startswith(f"view={k}/")]

    def refined_files(self, k: int) -> list[str]:
        """The professor's files of view k (the `refined` column, keyed by sample_id)."""
        prof = self.manifest.get("professor")
        if not prof:
            raise CacheError(f"{self.uri}: no refined column: run `raykd professor` on this cache first")
        return [posixpath.join(self.root, f["path"]) for f in prof["files"]
                if f["path"].startswith(f"professor/view={k}/")]

    def view_dataset(self, k: int, columns: list[str] | None = None):
        """A Ray Dataset of view partition k (one epoch's worth of rows), optionally only some columns."""
        import ray

        ds = ray.data.read_parquet(self.view_files(k), filesystem=self.fs)
        return ds.select_columns(columns) if columns else ds

    def read_table(self, columns: list[str] | None = None, views: list[int] | None = None):
        """Read columns straight with pyarrow (no Ray): for inspect and tests."""
        import pyarrow.parquet as pq
        import pyarrow as pa

        tables = []
        for k in views if views is not None else range(self.manifest["views"]):
            for path in self.view_files(k):
                with self.fs.open(path, "rb") as f:
                    tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)


def load_refined(fs, paths: list[str], by_view: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The professor's refined targets in `paths`, sorted by key: (keys, refined float32 (N, C)).
    The key is the sample id, or view_id * 2**40 + sample_id with `by_view` (several views)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=["sample_id", "view_id", "refined"]))
    t = pa.concat_tables(tables)
    keys = column_array(t, "sample_id").astype(np.int64)
    if by_view:
        keys = keys + column_array(t, "view_id").astype(np.int64) * (1 << 40)
    order = np.argsort(keys, kind="stable")
    return keys[order], column_array(t, "refined")[order].astype(np.float32)


def column_array(table, name: str) -> np.ndarray:
    """A fixed-shape tensor (or plain) column as one numpy array (rows, *shape)."""
    col = table.column(name).combine_chunks()
    if hasattr(col, "to_numpy_ndarray"):
        return col.to_numpy_ndarray()
    return col.to_numpy(zero_copy_only=False)


def inspect_cache(uri: str, s3_endpoint: str | None = None, verify: bool = False) -> str:
    """The summary `raykd inspect` prints; `verify` also checks every file's sha256."""
    cache = Cache(uri, s3_endpoint)
    if verify:
        cache.verify()
    m = cache.manifest
    per_col = cache.column_bytes()
    logit_cols = [f"logits.{t}" for t in cache.teachers]
    table = cache.read_table(["label", *logit_cols])
    labels = column_array(table, "label")
    lines = [
        f"cache      {uri}",
        f"dataset    {m['dataset']['name']} ({m['dataset']['train_samples']} train samples, "
        f"{m['dataset']['num_classes']} classes, image {'x'.join(map(str, m['dataset']['image_shape']))})",
        f"views      K={m['views']}  policy {m['policy']}  store_views={m['store_views']}",
        f"rows       {m['rows']}  in {len(m['files'])} files, {m['bytes'] / 2**20:.2f} MiB "
        f"({m['bytes'] / max(1, m['rows']):.0f} B per row, {m['bytes'] / max(1, m['dataset']['train_samples']):.0f} B per sample over K views)",
        f"built      {m['created']} in {m['build_seconds']:.1f}s, fingerprint {m['fingerprint'][:16]}"
        + ("  (verified: every file matches its sha256)" if verify else ""),
        "",
        f"{'column':<28} {'type':<32} {'B/row':>8}",
    ]
    for name, typ in m["columns"].items():
        lines.append(f"{name:<28} {typ:<32} {per_col.get(name, 0) / max(1, m['rows']):>8.1f}")
    lines += ["", f"{'teacher':<14} {'arch':<11} {'val acc':>8} {'cached-view acc':>16}"]
    probs = []
    for t in m["teachers"]:
        z = torch.from_numpy(column_array(table, f"logits.{t['name']}").astype(np.float32))
        probs.append(z.softmax(1))
        acc = (z.argmax(1).numpy() == labels).mean()
        lines.append(f"{t['name']:<14} {t['arch']:<11} {100 * t['val_acc']:>7.2f}% {100 * acc:>15.2f}%")
    ens = (torch.stack(probs).mean(0).argmax(1).numpy() == labels).mean()
    lines.append(f"{'ensemble':<14} {'mean prob':<11} {'':>8} {100 * ens:>15.2f}%")
    if m.get("professor"):
        p = m["professor"]
        lines.append(f"{'professor':<14} {'CAAE':<11} {'':>8} {100 * p['refined_acc']:>15.2f}%  "
                     f"(refined column, checkpoint {p['checkpoint_sha256'][:12]})")
    return "\n".join(lines)
