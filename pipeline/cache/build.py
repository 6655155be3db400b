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
import time

from raykd.pipeline.cache.passes import _local_pass, _ray_pass, ranges
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
from raykd.pipeline.core.progress import ProgressPrinter
from raykd.pipeline.core.records import BuildStarted, Manifest, ViewCommit, check, out_root


def cache_uri(cfg: Config) -> str:
    return cfg.cache.uri or os.path.join(os.path.abspath(cfg.run.out_dir), "cache")


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
    from raykd.pipeline.data.splits import load_splits

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
