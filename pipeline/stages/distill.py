"""`raykd distill`: train one student, from the teacher cache or with the teachers online.

Cached mode: epoch e reads view partition e mod K of the cache, so the student sees exactly the views
the teachers saw; each worker holds its share of the views in memory (read once) or streams them
through Ray Data (`distill.in_memory`). Online mode runs the same loop on the same views, rendered from
the source images, with the teachers inside each worker: the speed baseline and the check that the
cache changes nothing. The job runs on the shared harness (raykd.pipeline.harness.loop): one worker in one Ray
task (or in the Tune trial itself), several on Ray Train.

Output under <out_dir>/students/<name>/: student.safetensors and student.pt (state dict), method.safetensors
(the method's own trained modules, if any), metrics.jsonl / metrics.csv (every loss term, accuracies,
samples/s per epoch), student.json (summary + fingerprint) and config.resolved.yaml.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from raykd.methods import METHODS, MethodContext, build_method
from raykd.pipeline.cache import columns as C
from raykd.pipeline.core.config import Config
from raykd.pipeline.core.errors import CheckpointError, ConfigError, RaykdError
from raykd.pipeline.core.records import StageRecord, StudentRecord, atomic_path, inside, sha256_file
from raykd.pipeline.core.schema import check_output_name
from raykd.pipeline.harness.tracking import tracking_spec
from raykd.pipeline.models.checkpoints import read_verified, save_state_dict
from raykd.pipeline.models.plugins import job_imports
from raykd.pipeline.models.zoo import build_model, record_preprocess
from raykd.pipeline.stages.student_job import StudentJob

RECORD = "student.json"


def student_seed(cfg: Config) -> int:
    return cfg.run.seed if cfg.distill.student.seed is None else cfg.distill.student.seed


def student_name(cfg: Config) -> str:
    """`<method>[_refined|_both]-<arch>-s<seed>[-online]` unless `distill.name` says otherwise."""
    if cfg.distill.name:
        return cfg.distill.name
    m = cfg.method
    method = m.name + (f"_{m.targets}" if m.targets != "teachers" and METHODS.get(m.name).uses_teachers else "")
    online = "-online" if cfg.distill.teachers == "online" else ""
    arch = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.distill.student.arch)  # torchvision:x, module:factory
    name = f"{method}-{arch}-s{student_seed(cfg)}{online}"
    try:
        return check_output_name(name)
    except ValueError:
        raise ConfigError(f"distill.student.arch={cfg.distill.student.arch}: the student's folder name {name[:60]}... "
                          "would be longer than 100 characters; give it a shorter one with distill.name") from None


def student_record(sdir: str) -> StageRecord:
    """A student's record (student.json) and the files it lists (its weights)."""
    return StageRecord(os.path.join(sdir, RECORD), StudentRecord, "student record", files=lambda r: r["files"],
                       again="move its folder away to train it again")


def student_dir(cfg: Config) -> str:
    return inside(os.path.abspath(cfg.run.out_dir), "students", student_name(cfg))


def _teacher_sources(cfg: Config, splits, method_cls, online: bool):
    """(teacher names, their val accuracy, K, upstream fingerprint, cache or None, in-worker teacher entries)."""
    from raykd.pipeline.cache import Cache, cache_uri
    from raykd.pipeline.stages.teachers import teacher_dir, teacher_record

    out = os.path.abspath(cfg.run.out_dir)
    from_student = method_cls.student_teacher(cfg)
    if from_student:
        return _student_as_teacher(cfg, from_student, splits, online, out)
    if not online:
        cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint, wait=True)  # or one being built
        cache.expect(data_fingerprint=splits.fingerprint)
        # the targets' names: the teachers, or `ensemble` for a cache of their mean's top-k only (feature
        # methods read the teachers' maps, which are always per teacher)
        default = cache.sources if method_cls.uses_logits else cache.teachers
        names = (cfg.method.teachers or default) if method_cls.uses_teachers else []
        cache.expect(teachers=names)
        acc = {t["name"]: t["val_acc"] for t in cache.manifest["teachers"]}
        return names, acc, cache.manifest["views"], cache.manifest["fingerprint"], cache, []
    names = []
    if method_cls.uses_teachers:
        names = cfg.method.teachers or cfg.cache.teachers or [t.name for t in cfg.teachers.models]
    entries, acc = [], {}
    for n in names:
        rec = teacher_record(teacher_dir(out, n)).read()
        if rec is None:
            raise RaykdError(f"teacher {n!r} has no record under {teacher_dir(out, n)}: run `raykd teachers` first")
        if rec["data_fingerprint"] != splits.fingerprint:
            raise RaykdError(f"teacher {n!r} was trained on other data (data fingerprint differs): rerun `raykd teachers`")
        path = os.path.join(teacher_dir(out, n), rec["best"]["file"])
        if not os.path.isfile(path) or sha256_file(path) != rec["best"]["sha256"]:
            raise CheckpointError(f"teacher {n!r}: checkpoint {path} is missing or does not match its recorded sha256")
        entries.append({"name": n, "arch": rec["arch"], "path": path, "sha256": rec["best"]["sha256"],
                        **({"preprocess": rec["preprocess"]} if rec.get("preprocess") else {})})
        acc[n] = rec["val_acc"]
    upstream = hashlib.sha256(json.dumps(
        {"teachers": [[e["name"], e["sha256"]] for e in entries], "views": cfg.cache.views,
         "policy": splits.policy.as_dict(), "data": splits.fingerprint}, sort_keys=True).encode()).hexdigest()
    return names, acc, cfg.cache.views, upstream, None, entries


def _student_as_teacher(cfg: Config, name: str, splits, online: bool, out: str):
    """A finished student as the only teacher (e.g. `method.feed.from_student`), run in the workers (it is
    small) on the cached views (or on views rendered there when online)."""
    from raykd.pipeline.cache import Cache, cache_uri

    sdir = os.path.join(out, "students", name)
    rec = student_record(sdir).read()
    if rec is None:
        raise RaykdError(f"method.feed.from_student={name!r}: no finished student under {sdir}")
    path = os.path.join(sdir, "student.safetensors")
    if not os.path.isfile(path) or sha256_file(path) != rec["files"]["student.safetensors"]:
        raise CheckpointError(f"student {name!r}: {path} is missing or does not match its recorded sha256")
    entry = {"name": name, "arch": rec["arch"], "path": path, "sha256": rec["files"]["student.safetensors"]}
    cache = None
    if not online:
        cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint, wait=True)  # or one being built
        cache.expect(data_fingerprint=splits.fingerprint)
    views = cache.manifest["views"] if cache is not None else cfg.cache.views
    upstream = hashlib.sha256(f"{rec['fingerprint']}:{entry['sha256']}".encode()).hexdigest()
    return [name], {name: rec["val_acc"]}, views, upstream, cache, [entry]


def _professor_entry(cfg: Config) -> dict:
    """The trained professor (for online mode with refined targets), verified against its sha256."""
    from raykd.pipeline.stages.professor import professor_record

    out = os.path.join(os.path.abspath(cfg.run.out_dir), "professor")
    rec = professor_record(out).read()
    if rec is None:
        raise RaykdError(f"method.targets={cfg.method.targets} needs the professor: none under {out}; run `raykd professor`")
    path = os.path.join(out, rec["file"])
    if not os.path.isfile(path) or sha256_file(path) != rec["sha256"]:
        raise CheckpointError(f"professor checkpoint {path} is missing or does not match its recorded sha256")
    p = cfg.professor
    return {"path": path, "sha256": rec["sha256"], "latent_dim": p.latent_dim, "hidden": p.hidden, "ensemble": p.ensemble,
            "temperature": p.temperature}


def distill_fingerprint(cfg: Config, data_fp: str, upstream: str) -> str:
    d = cfg.distill
    payload = {"data": data_fp, "upstream": upstream, "mode": d.teachers, "student": d.student.arch,
               "seed": student_seed(cfg), "optim": d.optim.model_dump(mode="json"),
               "shuffle": d.shuffle_buffer, "workers": d.workers.num_workers,
               "method": cfg.method.own()}
    version = METHODS.get(cfg.method.name).version
    if version > 1:
        payload["method_version"] = version
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Plan:
    """A student to train: everything the driver worked out before its job starts."""

    cfg: Config
    name: str
    sdir: str
    fp: str
    upstream: str
    splits: Any
    teachers: list[str]
    online: bool
    student: nn.Module
    method: nn.Module
    mctx: dict
    views: int
    cache: Any
    online_teachers: list[dict]
    online_professor: dict | None
    t0: float = 0.0
    times: dict = dataclasses.field(default_factory=dict)  # the driver's phases before the job, seconds


def plan_student(cfg: Config, splits) -> Plan | dict:
    """Work out one student (no Ray): its teachers and their source, method, fingerprint. Returns its
    record when a finished student of the same fingerprint is there (nothing to train)."""
    d = cfg.distill
    online = d.teachers == "online"
    method_cls = METHODS.get(cfg.method.name)
    names, val_acc, views, upstream, cache, online_teachers = _teacher_sources(cfg, splits, method_cls, online)
    student = build_model(d.student.arch, splits.num_classes, splits.in_chans)
    known = {t["name"]: t for t in (cache.manifest["teachers"] if cache is not None else [])}
    known.update({t["name"]: t for t in online_teachers})  # online, or a student as teacher
    mctx = {"num_classes": splits.num_classes, "teachers": names, "teacher_val_acc": val_acc, "epochs": d.optim.epochs,
            "student_stages": {k: list(v) for k, v in student.stage_shapes(splits.image_size).items()},
            "teacher_stages": {n: {k: list(v) for k, v in build_model(
                known[n]["arch"], splits.num_classes, splits.in_chans, record_preprocess(known[n]))
                .stage_shapes(splits.image_size).items()} for n in names if n in known}}
    method = build_method(cfg.method, MethodContext(**mctx))
    online_professor = None
    if C.REFINED in method.columns():  # the professor is upstream too
        if cache is not None:
            cache.expect(columns=[C.REFINED])
            prof_fp = cache.manifest["professor"]["fingerprint"]
        else:
            online_professor = _professor_entry(cfg)
            prof_fp = online_professor["sha256"]
        upstream = hashlib.sha256(f"{upstream}:{prof_fp}".encode()).hexdigest()
    fp = distill_fingerprint(cfg, splits.fingerprint, upstream)
    sdir = student_dir(cfg)
    prev = student_record(sdir).reusable(fp)
    if prev is not None:
        return prev
    return Plan(cfg, student_name(cfg), sdir, fp, upstream, splits, names, online or bool(online_teachers), student,
                method, mctx, views, cache, online_teachers, online_professor)


def make_job(p: Plan, refs, progress, place, concurrent: int = 1) -> StudentJob:
    """The plan as a job, placed by `place` (a harness Placement: device, threads, checkpoint storage): the
    splits as object refs, the cache's files and columns, in memory or streamed."""
    from raykd.pipeline.cache.epochs import CacheViews, in_memory_choice, memory_budget, row_bytes

    cfg, d = p.cfg, p.cfg.distill
    cache_kw: dict = {}
    if p.cache is not None:
        cache = p.cache
        in_worker = {t["name"] for t in p.online_teachers}  # their outputs are computed, not read
        wanted = [c for c in p.method.columns() if C.teacher_of(c) not in in_worker]
        sources = [C.parse(c).source for c in wanted if C.parse(c).kind == "logits"]
        reader = cache.target_reader(sources) if sources else None
        cols = ["sample_id", "label", *(reader.all_columns if reader else []),
                *[c for c in wanted if C.parse(c).kind != "logits"]]
        cols += [C.PIXELS] if cache.manifest["store_views"] else [C.record(k) for k in p.splits.policy.record]
        cache.expect(columns=cols)
        cols += [C.scale(c) for c in cols if C.parse(c).kind == "feat" and C.scale(c) in cache.manifest["columns"]]
        used = sorted({e % p.views for e in range(d.optim.epochs)})
        nbytes = row_bytes(cache.manifest["columns"], cols) * len(p.splits.train) * len(used) // d.workers.num_workers
        files = cache.view_files_of(used)  # a ViewFiles: on a cache being built, views are waited for as read
        refined_files = {k: cache.refined_files(k) for k in used} if C.REFINED in cols else None
        files.checks.sha256.update(cache.checks([p for ps in (refined_files or {}).values() for p in ps]).sha256)
        views = CacheViews(cache.fs, files, tuple(c for c in cols if c != C.REFINED), files.checks, refined_files,
                           in_memory_choice(d.in_memory, nbytes, memory_budget() // max(1, concurrent)))
        cache_kw = {"cache_views": views, "targets": reader,
                    "train": None if cache.manifest["store_views"] else refs["train"]}
    else:
        cache_kw = {"train": refs["train"]}
    fault = json.loads(os.environ["RAYKD_FAULT"]) if os.environ.get("RAYKD_FAULT") else None
    splits = p.splits
    return StudentJob(
        kind="distill", name=p.name, run_name=f"student-{p.name}-{p.fp[:12]}", seed=student_seed(cfg),
        epochs=d.optim.epochs, workers=d.workers, storage=place.storage, device=place.start(), torch_threads=place.threads(d.workers),
        progress=progress, fault=fault, imports=job_imports(cfg),
        tracking=tracking_spec(cfg, "students", p.name, f"student-{p.name}-{p.fp[:12]}"),
        arch=d.student.arch, num_classes=splits.num_classes, in_chans=splits.in_chans,
        method=cfg.method.model_dump(mode="json"), method_ctx=p.mctx, optim=d.optim,
        views=p.views, data_seed=cfg.data.seed, policy=splits.policy.as_dict(), mean=splits.mean, std=splits.std,
        n_train=len(splits.train), val=refs["val"], test=refs["test"], shuffle_buffer=d.shuffle_buffer,
        device_views=d.device_views,
        test_every=d.test_every,
        # weights travel with the job (Ray's object store), not as paths: no node needs this one's disk
        online_teachers=tuple({**t, "weights": read_verified(t["path"], t["sha256"])} for t in p.online_teachers),
        online_professor=p.online_professor and {
            **p.online_professor, "weights": read_verified(p.online_professor["path"], p.online_professor["sha256"])},
        **cache_kw)


def finish_student(p: Plan, res) -> dict:
    """Write the student's outputs from its job's result (last state, metrics); returns its record."""
    t_done = time.time()
    st, history = res.state["task"], res.history
    files = {"student.safetensors": save_state_dict(st["student"], os.path.join(p.sdir, "student.safetensors"))}
    pt = os.path.join(p.sdir, "student.pt")
    with atomic_path(pt) as tmp:
        torch.save(st["student"], tmp)
    files["student.pt"] = sha256_file(pt)
    if st["method"]:
        files["method.safetensors"] = save_state_dict(st["method"], os.path.join(p.sdir, "method.safetensors"))
    with open(os.path.join(p.sdir, "metrics.jsonl"), "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")
    keys = list(dict.fromkeys(k for m in history for k in m))
    with open(os.path.join(p.sdir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    last = history[-1]
    times = [m["epoch_time_s"] for m in history]
    p.student.load_state_dict(st["student"])
    p.method.load_state_dict(st["method"])
    cfg = p.cfg
    rec = {
        "name": p.name, "method": cfg.method.name, "arch": cfg.distill.student.arch,
        "params": p.student.num_params(), "method_params": sum(x.numel() for x in p.method.parameters()),
        "seed": student_seed(cfg), "teachers": p.teachers,
        "mode": "online" if p.online else "cache", "epochs": len(history), "val_acc": last["val_acc"],
        "test_acc": last["test_acc"], "best_val_acc": max(m["val_acc"] for m in history),
        "epoch_time_s": round(float(np.median(times)), 3), "files": files, "fingerprint": p.fp, "upstream": p.upstream,
        "method_ctx": p.mctx,  # what rebuilds the method's modules later (raykd export of IMF's inference model)
    }
    rec.update(p.method.export(p.student, p.sdir, p.splits, files))
    rec["wall_time_s"] = round(time.time() - p.t0, 2)
    if res.profile:  # where the time went, from the job's start to its outputs (bench/overhead.py reads it)
        pr = res.profile
        rec["profile"] = {**{k: round(v, 3) for k, v in p.times.items()}, "job_start_s": round(pr["started"] - p.t0, 3),
                          **{k: round(pr[k], 3) for k in ("build_s", "load_s", "train_s", "eval_s", "report_s")},
                          "job_end_s": round(t_done - pr["ended"], 3), "outputs_s": round(time.time() - t_done, 3)}
    student_record(p.sdir).write(rec)
    return rec








def format_results(records: list[dict]) -> str:
    head = (f"{'student':<22} {'method':<7} {'arch':<9} {'params':>8} {'teachers':<9} {'val acc':>8} {'test acc':>9} "
            f"{'epoch s':>8}")
    rows = [head, "-" * len(head)]
    notes = []
    for r in records:
        rows.append(f"{r['name']:<22} {r['method']:<7} {r['arch']:<9} {r['params']:>8,} {r['mode']:<9} "
                    f"{100 * r['val_acc']:>7.2f}% {100 * r['test_acc']:>8.2f}% {r['epoch_time_s']:>8.2f}")
        notes += METHODS.get(r["method"]).notes(r)
    return "\n".join(rows + ([""] + notes if notes else []))
