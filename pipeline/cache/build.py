"""`raykd cache`: run every teacher once over K views of every training sample into a Parquet cache.

The missing views are built pass by pass (`cache.views_per_pass`; default one view per pass in this
process, all at once with Ray Data): render the
views (sample id, view id -> record + pixels), every teacher's batched `inference_mode` forward
(`TeacherForward`, adding its columns), the targets (top-k of each teacher or of their mean, full
logits kept or dropped), Parquet files straight into `views/view=k/`; each view is then committed by
its record under `_views/`. Two engines run those stages (`cache.engine`) and write the same files:
`local`, in this process without Ray (`_local_pass`), and `ray`, one Ray Data pipeline per pass with
an actor pool per teacher (`_ray_pass`: streamed folders, several actors, clusters). A rerun after a crash keeps committed views, clears the
partitions of uncommitted ones and redoes them, so every (sample_id, view_id) row exists exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time

import numpy as np
import torch
from raykd.pipeline.cache import columns as C
from raykd.pipeline.cache.codecs import mean_probs, quantize_int8, topk_encode
from raykd.pipeline.cache.reader import Cache
from raykd.pipeline.cache.storage import (
    BUILD,
    LOCK,
    MANIFEST,
    REFINED,
    SCHEMA_VERSION,
    VIEWS,
    BuildLock,
    CacheError,
    describe_files,
    files_present,
    marker,
    open_fs,
    read_json,
    storage_errors,
    storage_message,
    view_dir,
    write_json,
)
from raykd.pipeline.core.config import Config
from raykd.pipeline.core.errors import ConfigError, RaykdError
from raykd.pipeline.core.log import log
from raykd.pipeline.core.progress import ProgressPrinter, emit
from raykd.pipeline.core.records import (
    BuildStarted,
    Manifest,
    ViewCommit,
    check,
    out_root,
)
from raykd.pipeline.data.views import ViewPolicy, make_views
from raykd.pipeline.models.checkpoints import read_verified
from raykd.pipeline.models.plugins import job_imports

RENDER_ROWS = 4096  # rows of one render batch, at most: batch_size samples x the views of a pass
ROW_GROUP = 2048  # rows of a Parquet row group the local engine writes (a view of 8,000 rows: 4 groups, the first 3 while computing)


def cache_uri(cfg: Config) -> str:
    return cfg.cache.uri or os.path.join(os.path.abspath(cfg.run.out_dir), "cache")


# --------------------------------------------------------------------------------------------------
# the Ray Data stages


def split_to_ray(split, rows_per_block: int = 4096):
    """A split as a Ray Dataset of rows {sample_id, label, image (H, W, C) uint8 tensor}. A streamed
    folder's rows start as file paths and are decoded by Ray Data tasks (`decode_files`), not here."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray
    from raykd.pipeline.data.datasets import FileImages

    if isinstance(split.images, FileImages):
        tables = [pa.table({"sample_id": pa.array(split.ids[s:s + rows_per_block]),
                            "label": pa.array(split.labels[s:s + rows_per_block]),
                            "path": pa.array(list(split.images.paths[s:s + rows_per_block]), pa.string())})
                  for s in range(0, len(split), rows_per_block)]
        return ray.data.from_arrow(tables).map_batches(decode_files, batch_format="numpy", batch_size=256,
                                                       fn_kwargs={"size": split.images.size})
    tables = []
    for s in range(0, len(split), rows_per_block):
        e = s + rows_per_block
        tables.append(pa.table({
            "sample_id": pa.array(split.ids[s:e]),
            "label": pa.array(split.labels[s:e]),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.images[s:e])),
        }))
    return ray.data.from_arrow(tables)


def decode_files(batch: dict, size: int) -> dict:
    """Paths -> images (a streamed folder's rows, decoded in a Ray Data task)."""
    from raykd.pipeline.data.datasets import FileImages

    return {"sample_id": batch["sample_id"], "label": batch["label"],
            "image": FileImages(batch["path"], size)[np.arange(len(batch["path"]))]}


def render_views(batch: dict, view_ids: list[int], data_seed: int, policy: dict) -> dict:
    """Stage 1: source rows -> one row per (sample, view): the view record and its pixels.
    A pure function of (seed, sample id, view id); `view` is the Hive partition key (= view_id)."""
    ids = np.tile(batch["sample_id"].astype(np.int64), len(view_ids))
    vids = np.repeat(np.asarray(view_ids, dtype=np.int32), len(batch["sample_id"]))
    images = np.concatenate([batch["image"]] * len(view_ids))
    policy = ViewPolicy(**policy)
    pixels, rec = make_views(images, ids, vids, data_seed, policy)
    return {
        "sample_id": ids,
        "view_id": vids,
        "view": vids.copy(),
        "label": np.tile(batch["label"].astype(np.int64), len(view_ids)),
        **{C.record(k): rec[k] for k in policy.record},
        C.PIXELS: pixels,
    }


class TeacherForward:
    """Stage 2..N+1, one actor pool per teacher: loads the model once, adds its logits (fp16) and maps."""

    def __init__(self, name: str, arch: str, ckpt_path: str, weights: bytes, num_classes: int, in_chans: int,
                 mean, std, layers: list[str], feat_dtype: str, device: str, threads: int | None, progress=None,
                 imports=(), preprocess: dict | None = None):
        from raykd.pipeline.models import plugins
        from raykd.pipeline.models.checkpoints import load_into, state_from_bytes
        from raykd.pipeline.models.zoo import build_model, record_preprocess
    
        plugins.load(imports)
        if threads:  # else Ray's default: as many as the actor's CPUs
            torch.set_num_threads(threads)
        self.name, self.layers, self.feat_dtype, self.progress = name, layers, feat_dtype, progress
        self.mean, self.std = mean, std
        self.device = torch.device(device)
        self.model = build_model(arch, num_classes, in_chans, record_preprocess({"preprocess": preprocess}))
        load_into(self.model, state_from_bytes(weights, ckpt_path), ckpt_path, arch)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        from raykd.pipeline.data.datasets import as_tensor, normalize

        x = normalize(as_tensor(batch[C.PIXELS]).to(self.device), self.mean, self.std)
        logits, stages = self.model.forward_stages(x)
        out = dict(batch)
        out[C.logits(self.name)] = logits.half().cpu().numpy()
        for layer in self.layers:
            fmap = stages[layer].float()
            col = C.feat(self.name, layer)
            if self.feat_dtype == "int8":
                q, scale = quantize_int8(fmap)
                out[col], out[C.scale(col)] = q.cpu().numpy(), scale.cpu().numpy()
            else:
                out[col] = fmap.half().cpu().numpy()
        ids, vids = batch["sample_id"], batch["view_id"]  # a batch's identity: retried batches count once
        emit(self.progress, (self.name, len(x), (int(ids[0]), int(vids[0]), int(ids[-1]), int(vids[-1]), len(x))))
        return out


def encode_targets(batch: dict, teachers: list[str], keep_logits: bool, k: int | None, of: str,
                   temperature: float) -> dict:
    """The last stage: top-k probabilities at tau of each teacher (or of their mean), full logits kept or not."""
    out = dict(batch)
    if k:
        zs = {t: torch.from_numpy(np.ascontiguousarray(batch[C.logits(t)])) for t in teachers}
        sources = {C.ENSEMBLE: mean_probs(list(zs.values()), temperature)} if of == "ensemble" else \
            {t: torch.softmax(z.float() / temperature, dim=1) for t, z in zs.items()}
        for src, p in sources.items():
            values, indices = topk_encode(p, k)
            probs_col, idx_col = C.topk(src)
            out[probs_col], out[idx_col] = values.numpy(), indices.numpy()
    if not keep_logits:
        for t in teachers:
            out.pop(C.logits(t))
    return out


# --------------------------------------------------------------------------------------------------
# build


def _teacher_entries(cfg: Config, out_dir: str, splits) -> list[dict]:
    from raykd.pipeline.stages.teachers import load_teacher, teacher_dir

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
            **({"preprocess": rec["preprocess"]} if rec.get("preprocess") else {}),
        })
    return entries


def _targets(cfg: Config, num_classes: int) -> dict:
    """The manifest's `targets`: full logits or not, top-k (k, of, temperature) or not."""
    t = cfg.cache.topk
    if t is not None and t.k >= num_classes:
        raise ConfigError(f"cache.topk.k={t.k}: the data set has {num_classes} classes; keep fewer (or use the full "
                          "logits, cache.logits)")
    return {"logits": cfg.cache.logits, "topk": t.model_dump(mode="json") if t is not None else None}


def cache_fingerprint(splits, cfg: Config, teachers: list[dict]) -> str:
    c = cfg.cache
    payload = {
        "schema": SCHEMA_VERSION, "data": splits.fingerprint, "data_seed": cfg.data.seed,
        "policy": splits.policy.as_dict(), "views": c.views, "store_views": c.stores_views(splits.policy),
        "targets": _targets(cfg, splits.num_classes), "feat_dtype": c.feat_dtype,
        "teachers": [{k: t[k] for k in ("name", "arch", "checkpoint_sha256", "layers", "preprocess") if k in t}
                     for t in teachers],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_cache(cfg: Config, overwrite: bool = False, repair: bool = False, on_first_view=None) -> dict:
    """Build (or finish, or reuse) the cache for `cfg`; returns its manifest. `repair`: check every part
    file of a finished cache of this config against its sha256 and rebuild the views with a damaged one.
    `on_first_view()` is called once students can open it: its first view committed (`Cache(wait=True)`)."""
    from raykd.pipeline.data.datasets import load_splits

    splits = load_splits(cfg.data)
    out = out_root(cfg)
    uri = cache_uri(cfg)
    fs, root = open_fs(uri, cfg.cache.s3_endpoint)
    try:  # what the URI holds is named first: a damaged or foreign cache is the input's problem
        manifest = read_json(fs, posixpath.join(root, MANIFEST))
        building = read_json(fs, posixpath.join(root, BUILD), BuildStarted, "unfinished build record")
    except storage_errors() as e:
        raise CacheError(storage_message(f"cache.uri={uri}", e)) from None
    if manifest is not None and not overwrite:
        if not isinstance(manifest, dict) or manifest.get("schema_version") == SCHEMA_VERSION:
            try:
                check(manifest, Manifest, f"{uri}/{MANIFEST}", "cache manifest", CacheError)
            except CacheError as e:
                raise CacheError(f"{e}; use another cache.uri, or --overwrite to replace what is there") from None
            _refuse_other_inputs(cfg, splits, uri, manifest)
    try:
        teachers = _teacher_entries(cfg, out, splits)
    except RaykdError as e:
        if manifest is None or overwrite:
            raise
        raise type(e)(f"{e} (cache.uri={uri} holds a finished cache; it is reused only once this config's teachers "
                      "are found to be the ones it was built from)") from None
    fp = cache_fingerprint(splits, cfg, teachers)
    if repair:
        if manifest is None or manifest.get("fingerprint") != fp or manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{uri}: --repair mends a finished cache of this config, and this is not one (no manifest, "
                             "or other inputs); build it with `raykd cache`")
        return _repair(cfg, splits, teachers, fp, uri, fs, root, manifest)
    if manifest is not None and manifest.get("fingerprint") == fp and manifest.get("schema_version") == SCHEMA_VERSION \
            and not overwrite:
        Cache(uri, cfg.cache.s3_endpoint)  # its part files are all there, at their sizes: else named, not reused
        log.info(f"[cache] {uri}: up to date (fingerprint {fp[:12]}), reused")
        return manifest
    other = manifest or building
    if other is not None and not overwrite:
        if manifest is not None and manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{uri} holds a cache of another layout (schema_version {manifest.get('schema_version')!r}"
                             f"{', the first' if manifest.get('schema_version') == 1 else ''}): rebuild it here with "
                             "--overwrite (the teachers are reused, not retrained), or use another cache.uri")
        if other.get("fingerprint") != fp:
            what = "a finished cache" if manifest else "an unfinished build"
            raise CacheError(f"{uri} holds {what} of other inputs (fingerprint {other.get('fingerprint', '?')[:12]}, "
                             f"this config {fp[:12]}): use another cache.uri, or --overwrite to replace it")
    fs.makedirs(root, exist_ok=True)
    with BuildLock(fs, root, uri) as lock:
        if overwrite:
            log.info(f"[cache] --overwrite: removing what {uri} holds")
            for path in fs.ls(root, detail=False):
                if posixpath.basename(path) != LOCK:
                    fs.rm(path, recursive=True)
        started = time.time()
        write_json(fs, posixpath.join(root, BUILD), {"fingerprint": fp, "started": started})
        try:
            manifest = _build_views(cfg, splits, teachers, fp, uri, fs, root, lock, on_first_view)
        except BaseException as e:  # for the students waiting on this build: why it ended
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else (str(e) if isinstance(e, RaykdError) else
                                                                          f"{type(e).__name__}: {str(e)[:300]}")
            if not lock.lost:
                try:
                    write_json(fs, posixpath.join(root, BUILD), {"fingerprint": fp, "started": started, "error": why})
                except Exception:  # noqa: BLE001 - the build's own error is the one to raise
                    pass
            raise
        fs.rm(posixpath.join(root, BUILD))  # after the manifest: a build that dies before leaves its record
        return manifest


def ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '[0-2, 5, 7-8]': a console line stays short whatever K is."""
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return f"[{', '.join(out)}]"


def _refuse_other_inputs(cfg: Config, splits, uri: str, manifest: dict) -> None:
    """A finished cache whose inputs visibly differ from the config's (data, K, teachers' names and archs),
    refused before the teachers' records are looked for: the cache.uri is what is wrong then."""
    names = cfg.cache.teachers or [t.name for t in cfg.teachers.models]
    arch = {t.name: t.arch for t in cfg.teachers.models}
    have = [(t["name"], t["arch"]) for t in manifest["teachers"]]
    differ = []
    if manifest["dataset"]["fingerprint"] != splits.fingerprint:
        differ.append(f"data {manifest['dataset']['name']} (another fingerprint)")
    if manifest["views"] != cfg.cache.views:
        differ.append(f"K={manifest['views']} views (cache.views={cfg.cache.views} here)")
    if have != [(n, arch[n]) for n in names]:
        differ.append(f"teachers {[n for n, _ in have]} ({names} here)")
    if differ:
        raise CacheError(f"{uri} holds a finished cache of other inputs: {', '.join(differ)}; use another cache.uri, "
                         "or --overwrite to replace it")


def _damaged(fs, root: str, files: list[dict]) -> list[str]:
    """The listed part files that are missing or do not match their size and sha256."""
    bad = []
    for f in files:
        path = posixpath.join(root, f["path"])
        try:
            with fs.open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            bad.append(f["path"])
            continue
        if len(data) != f["bytes"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
            bad.append(f["path"])
    return bad


def _repair(cfg, splits, teachers, fp, uri, fs, root, manifest) -> dict:
    """Rebuild the views that hold a damaged part file; keep every other view. A damaged (or orphaned) refined
    column is dropped: `raykd professor` adds it again."""
    import re

    bad = _damaged(fs, root, [*manifest["files"], *(manifest.get("professor") or {}).get("files", [])])
    if not bad:
        log.info(f"[cache] {uri}: every part file matches its sha256; nothing to repair")
        return manifest
    views = sorted({int(m.group(1)) for p in bad if (m := re.match(rf"{VIEWS}/view=(\d+)/", p))})
    log.info(f"[cache] {uri}: {len(bad)} damaged part file(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
             f"rebuilding view(s) {ranges(views)}" + (", dropping the refined column" if manifest.get("professor") else ""))
    with BuildLock(fs, root, uri) as lock:
        write_json(fs, posixpath.join(root, BUILD), {"fingerprint": fp, "started": time.time()})
        fs.rm(posixpath.join(root, MANIFEST))  # uncommit first: a reader never sees a half-mended cache
        for k in views:
            if fs.exists(marker(root, k)):
                fs.rm(marker(root, k))
            if fs.exists(view_dir(root, k)):
                fs.rm(view_dir(root, k), recursive=True)
        if fs.exists(posixpath.join(root, REFINED)):
            fs.rm(posixpath.join(root, REFINED), recursive=True)
        repaired = _build_views(cfg, splits, teachers, fp, uri, fs, root, lock)
        fs.rm(posixpath.join(root, BUILD))
    if manifest.get("professor"):
        log.info(f"[cache] {uri}: repaired; run `raykd professor` to add the refined column again")
    return repaired


def engine(cfg: Config, splits) -> str:
    """`cache.engine` resolved: `auto` is `local` unless the split is a streamed folder, a teacher asks for
    more than one actor, or raykd runs on a cluster (ray.address / RAY_ADDRESS)."""
    from raykd.pipeline.data.datasets import FileImages
    from raykd.pipeline.harness.raysetup import is_local

    c = cfg.cache
    if c.engine != "auto":
        return c.engine
    names = c.teachers or [t.name for t in cfg.teachers.models]
    local = (not isinstance(splits.train.images, FileImages) and all(c.actors(n) == 1 for n in names)
             and is_local(cfg.ray))
    return "local" if local else "ray"


def _build_views(cfg, splits, teachers, fp, uri, fs, root, lock: BuildLock, on_first_view=None) -> dict:
    from raykd.pipeline.harness.raysetup import resolve_device

    c = cfg.cache
    targets = _targets(cfg, splits.num_classes)
    how = engine(cfg, splits)
    if how == "ray":  # first: ray.data reads raykd's logging settings when imported, and `auto` asks the cluster for GPUs
        from raykd.pipeline.harness.raysetup import init_ray

        init_ray(cfg)
    device = resolve_device(cfg.run.device)
    t_start = time.time()
    views_meta, todo = {}, []
    for k in range(c.views):
        done = read_json(fs, marker(root, k), ViewCommit, "view commit record")
        if done is not None and done.get("fingerprint") == fp and files_present(fs, root, done["files"]):
            views_meta[k] = done
        else:
            todo.append(k)

    def commit_so_far() -> None:  # the manifest of the views committed so far, for students to start on
        so_far = _manifest(cfg, splits, teachers, fp, fs, root, views_meta, targets, time.time() - t_start)
        write_json(fs, posixpath.join(root, BUILD), {"fingerprint": fp, "started": t_start, "manifest": so_far})
        if on_first_view is not None:
            on_first_view()

    if views_meta:
        log.info(f"[cache] views {ranges(sorted(views_meta))} already committed, kept")
        commit_so_far()
    if todo:
        run_pass = (_local_pass if how == "local" else _ray_pass)(cfg, splits, teachers, targets, device, fs, root)
    # a local pass per view: each is committed as soon as its rows are written, so a student can start on it
    # (a Ray Data pass reads the source once for all its views)
    per_pass = c.views_per_pass or (1 if how == "local" else len(todo)) or 1
    for group in [todo[i:i + per_pass] for i in range(0, len(todo), per_pass)]:
        t0 = time.time()
        log.info(f"[cache] views {ranges(group)}: {len(splits.train)} samples x {len(group)} views x {len(teachers)} teachers "
                 f"({', '.join(t['name'] for t in teachers)}), {'in this process' if how == 'local' else 'Ray Data'}")
        for k in group:  # what a killed run left in these partitions was never committed
            if fs.exists(marker(root, k)):
                fs.rm(marker(root, k))
            if fs.exists(view_dir(root, k)):
                fs.rm(view_dir(root, k), recursive=True)
        run_pass(group, ProgressPrinter(totals={t["name"]: len(splits.train) * len(group) for t in teachers},
                                        prefix=f"[cache] views {ranges(group)}: ", local=how == "local"))
        fs.invalidate_cache()  # other processes may have written: drop this client's cached listings
        lock.check()  # still this build's cache
        for k in group:  # commit view by view
            files = describe_files(fs, root, view_dir(root, k))
            rows = sum(f["rows"] for f in files)
            if rows != len(splits.train):
                raise CacheError(f"view {k}: wrote {rows} rows, expected {len(splits.train)}; not committed")
            views_meta[k] = {"fingerprint": fp, "view": k, "files": files, "rows": rows}
            write_json(fs, marker(root, k), views_meta[k])
        commit_so_far()
        log.info(f"[cache] views {ranges(group)}: committed in {time.time() - t0:.1f}s")
    from raykd.pipeline.core.config import dump_config

    with fs.open(posixpath.join(root, "config.resolved.yaml"), "wb") as f:  # the config that built it
        f.write(dump_config(cfg).encode())
    manifest = _manifest(cfg, splits, teachers, fp, fs, root, views_meta, targets, time.time() - t_start)
    lock.check()
    write_json(fs, posixpath.join(root, MANIFEST), manifest)  # last: the commit marker
    log.info(f"[cache] {uri}: {manifest['rows']} rows, {manifest['bytes'] / 2**20:.1f} MiB, manifest written")
    return read_json(fs, posixpath.join(root, MANIFEST))  # as every later reader will see it


def _forward_kwargs(cfg, splits, t: dict, device: str, threads: int | None, progress) -> dict:
    """TeacherForward's arguments for teacher entry `t` (its checkpoint read and verified here)."""
    c = cfg.cache
    return {"name": t["name"], "arch": t["arch"], "ckpt_path": t["checkpoint"],
            "weights": read_verified(t["checkpoint"], t["checkpoint_sha256"]), "num_classes": splits.num_classes,
            "in_chans": splits.in_chans, "mean": splits.mean, "std": splits.std, "layers": list(t["layers"]),
            "feat_dtype": c.feat_dtype, "device": device, "threads": threads, "progress": progress,
            "imports": job_imports(cfg), "preprocess": t.get("preprocess")}


def _targets_kwargs(targets: dict, teachers: list[dict]) -> dict | None:
    """encode_targets' arguments, or None when the rows keep every teacher's logits and nothing else."""
    if not (targets["topk"] or not targets["logits"]):
        return None
    tk = targets["topk"] or {}
    return {"teachers": [t["name"] for t in teachers], "keep_logits": targets["logits"], "k": tk.get("k"),
            "of": tk.get("of", "teachers"), "temperature": tk.get("temperature", 1.0)}


def _local_pass(cfg, splits, teachers, targets, device, fs, root):
    """A pass in this process, no Ray: every teacher loaded once for the whole build, then per batch of
    samples the views rendered, each teacher's forward (torch's threads: every core, or
    cache.threads_per_actor), the targets, and each view's rows appended to its Parquet file (about
    cache.rows_per_file rows) in row groups of ROW_GROUP rows, which a writer thread encodes and compresses
    while the next batches compute (pyarrow and zstd release the GIL). The files are what the Ray Data pass writes: same columns,
    same types, `views/view=k/` partitions without the `view` column."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    c = cfg.cache
    forwards = [TeacherForward(**_forward_kwargs(cfg, splits, t, device, c.threads_per_actor, None)) for t in teachers]
    encode = _targets_kwargs(targets, teachers)
    store = c.stores_views(splits.policy)
    n = len(splits.train)

    def to_table(batch: dict):
        cols = {k: (pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v)) if v.ndim > 1 else pa.array(v))
                for k, v in batch.items() if k != "view"}
        return pa.table(cols)

    class ViewFile:
        """View k's Parquet file being written: row groups of about ROW_GROUP rows appended by the writer
        thread while the next batches compute; a new file after about cache.rows_per_file rows."""

        def __init__(self, k: int):
            self.k, self.part, self.tables, self.queued, self.rows, self.out = k, 0, [], 0, 0, None

        def add(self, table) -> list:  # in the main thread: what to hand the writer, if anything
            self.tables.append(table)
            self.queued += table.num_rows
            return [self._group()] if self.queued >= min(ROW_GROUP, c.rows_per_file) else []

        def _group(self):
            tables, self.tables, self.queued = self.tables, [], 0
            self.rows += sum(t.num_rows for t in tables)
            last = self.rows >= c.rows_per_file
            if last:
                self.rows = 0
            return lambda: self._write(tables, last)

        def close(self) -> list:
            return [self._group()] if self.tables else []

        def _write(self, tables, last: bool) -> None:  # in the writer thread, in order
            table = pa.concat_tables(tables)
            if self.out is None:
                self.sink = pa.BufferOutputStream()
                self.out = pq.ParquetWriter(self.sink, table.schema, compression="zstd")
            self.out.write_table(table, row_group_size=table.num_rows)
            if last:
                self.finish()

        def finish(self) -> None:
            if self.out is None:
                return
            self.out.close()
            fs.makedirs(view_dir(root, self.k), exist_ok=True)
            fs.pipe_file(posixpath.join(view_dir(root, self.k), f"{uuid.uuid4().hex}_{self.part:06d}.parquet"),
                         self.sink.getvalue().to_pybytes())
            self.out, self.part = None, self.part + 1

    def run(group: list[int], progress: ProgressPrinter) -> None:
        for f in forwards:
            f.progress = progress.queue
        spent = dict.fromkeys(("render", "forward", "targets", "arrow", "writer"), 0.0)  # seconds, for `-v`
        pending, files = [], {k: ViewFile(k) for k in group}
        step = max(1, min(c.batch_size, RENDER_ROWS // len(group)))
        with progress, ThreadPoolExecutor(1, thread_name_prefix="raykd-cache-write") as writer:
            for s in range(0, n, step):
                e = min(n, s + step)
                t = time.perf_counter()
                batch = render_views({"sample_id": splits.train.ids[s:e], "label": splits.train.labels[s:e],
                                      "image": np.asarray(splits.train.images[s:e])}, group, cfg.data.seed,
                                     splits.policy.as_dict())
                spent["render"] += time.perf_counter() - t
                for j in range(0, len(batch["sample_id"]), c.batch_size):  # the teachers' batches
                    sub = {key: v[j:j + c.batch_size] for key, v in batch.items()}
                    t = time.perf_counter()
                    for f in forwards:
                        sub = f(sub)
                    t, spent["forward"] = time.perf_counter(), spent["forward"] + time.perf_counter() - t
                    if encode:
                        sub = encode_targets(sub, **encode)
                    if not store:
                        sub.pop(C.PIXELS)
                    t, spent["targets"] = time.perf_counter(), spent["targets"] + time.perf_counter() - t
                    for k in group:  # rows are view-major within a render batch
                        mask = sub["view_id"] == k
                        if mask.any():
                            pending += [writer.submit(w) for w in files[k].add(to_table({key: v[mask] for key, v in sub.items()}))]
                    t, spent["arrow"] = time.perf_counter(), spent["arrow"] + time.perf_counter() - t
                    while len(pending) > 2 * len(group):  # a bounded backlog; a failed write raises here
                        pending.pop(0).result()
                    spent["writer"] += time.perf_counter() - t
            t = time.perf_counter()
            for f in files.values():
                pending += [writer.submit(w) for w in f.close()]
                pending.append(writer.submit(f.finish))
            for p in pending:
                p.result()
            spent["writer"] += time.perf_counter() - t
        log.debug("[cache] views " + ranges(group) + ": " + ", ".join(f"{k} {v:.2f}s" for k, v in spent.items())
                  + f" (writer: waiting for the Parquet writer thread; torch threads {torch.get_num_threads()})")

    return run


def _ray_pass(cfg, splits, teachers, targets, device, fs, root):
    """A pass as one Ray Data pipeline: render, one actor pool per teacher, the targets, write_parquet."""
    from raykd.pipeline.harness.raysetup import check_fits, local_thread_share

    c = cfg.cache
    import ray  # started by _build_views
    from ray.data._internal.tensor_extensions.arrow import (
        FixedShapeTensorFormat,  # the enum's only home in 2.60
    )

    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE  # pyarrow-native tensors
    ctx.enable_progress_bars = sys.stderr.isatty()  # Ray Data's bars in a terminal; our count lines anywhere
    # By default every actor may use all the node's cores, and the OS shares them: a stage waiting for
    # its input leaves its cores to the others. On 2 cores with 3 teachers this built views 14-19 % faster
    # than one thread per actor (cores split evenly), whose slowest teacher held everyone back.
    threads = c.threads_per_actor or local_thread_share(cfg.ray, 1)
    check_fits({"CPU": c.cpus_per_actor, "GPU": c.gpus_per_actor if device == "cuda" else 0},
               "cache.cpus_per_actor/gpus_per_actor")
    encode = _targets_kwargs(targets, teachers)

    def run(group: list[int], progress: ProgressPrinter) -> None:
        # a render batch of n samples becomes n x len(group) rows: at most RENDER_ROWS of them whatever K
        # is (else its memory grows with the views of a pass); a few views a pass render batch_size samples
        ds = split_to_ray(splits.train, rows_per_block=max(c.batch_size, 1024)).map_batches(
            render_views, batch_format="numpy", batch_size=max(1, min(c.batch_size, RENDER_ROWS // len(group))),
            fn_kwargs={"view_ids": group, "data_seed": cfg.data.seed, "policy": splits.policy.as_dict()})
        for t in teachers:
            res = {"num_gpus": c.gpus_per_actor} if device == "cuda" else {}
            ds = ds.map_batches(TeacherForward, batch_format="numpy", batch_size=c.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=c.actors(t["name"])), num_cpus=c.cpus_per_actor,
                                **res, fn_constructor_kwargs=_forward_kwargs(cfg, splits, t, device, threads, progress.queue))
        if encode:
            ds = ds.map_batches(encode_targets, batch_format="numpy", batch_size=c.batch_size, fn_kwargs=encode)
        if not c.stores_views(splits.policy):
            ds = ds.drop_columns([C.PIXELS])
        # Straight into the views/view=k partitions (file names are unique per write): no move, which on
        # S3 would be a copy of everything. A view counts only once its record under _views/ is written.
        # A write task gathers about rows_per_file rows of each view of the pass before writing, so files
        # are few and large while the compute stages stay fine-grained. (Ray marks min_rows_per_file with
        # partition_cols deprecated after Feb 2027; Ray is pinned to 2.60 here.)
        with progress:
            ds.write_parquet(posixpath.join(root, VIEWS), filesystem=fs, partition_cols=["view"],
                             min_rows_per_file=c.rows_per_file * len(group), compression="zstd")

    return run


def type_str(t) -> str:
    """'tensor<halffloat>[10]' for Arrow's fixed-shape tensors, Arrow's own name otherwise."""
    if hasattr(t, "value_type") and hasattr(t, "shape"):
        return f"tensor<{t.value_type}>{list(t.shape)}"
    return str(t)


def _manifest(cfg, splits, teachers, fp, fs, root, views_meta, targets, seconds) -> dict:
    import pyarrow.parquet as pq

    first = posixpath.join(root, views_meta[min(views_meta)]["files"][0]["path"])
    with fs.open(first, "rb") as f:
        schema = pq.read_schema(f)
    files = [f for k in sorted(views_meta) for f in views_meta[k]["files"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 2),
        "layout": {"views": f"{VIEWS}/view=<k>/*.parquet", "refined": f"{REFINED}/view=<k>/*.parquet"},
        "dataset": {"name": splits.name, "fingerprint": splits.fingerprint, "seed": cfg.data.seed,
                    "num_classes": splits.num_classes, "image_shape": list(splits.train.images.shape[1:]),
                    "train_samples": len(splits.train), "mean": splits.mean, "std": splits.std},
        "views": cfg.cache.views,
        "policy": splits.policy.as_dict(),
        "store_views": cfg.cache.stores_views(splits.policy),
        "targets": targets,
        "feat_dtype": cfg.cache.feat_dtype,
        "teachers": [{k: t[k] for k in ("name", "arch", "checkpoint_sha256", "val_acc", "test_acc", "layers",
                                        "preprocess") if k in t} for t in teachers],
        "columns": {field.name: type_str(field.type) for field in schema},
        "shapes": {field.name: list(field.type.shape) for field in schema if hasattr(field.type, "shape")},
        "files": files,
        "rows": sum(f["rows"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
    }
