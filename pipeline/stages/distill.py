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

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from raykd.methods import METHODS, MethodContext, Targets, build_method
from raykd.pipeline.cache import columns as C
from raykd.pipeline.core.config import (
    Config,
    MethodSection,
    OptimSection,
    variant,
    write_resolved,
)
from raykd.pipeline.core.errors import (
    CheckpointError,
    ConfigError,
    RaykdError,
    StageFailed,
)
from raykd.pipeline.core.log import log
from raykd.pipeline.core.progress import ProgressPrinter
from raykd.pipeline.core.records import (
    StudentRecord,
    atomic_path,
    inside,
    load_record,
    out_root,
    output_lock,
    write_record,
)
from raykd.pipeline.core.schema import check_output_name
from raykd.pipeline.harness.loop import Job, JobFailed, JobRunner, Task, failure_message
from raykd.pipeline.harness.raysetup import check_fits
from raykd.pipeline.harness.tracking import tracking_spec
from raykd.pipeline.harness.training import (
    Evaluator,
    Precision,
    make_optimizer,
    optimizer_step,
)
from raykd.pipeline.models.checkpoints import (
    read_verified,
    save_state_dict,
    sha256_file,
)
from raykd.pipeline.models.plugins import job_imports
from raykd.pipeline.models.zoo import build_model, record_preprocess

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


def student_dir(cfg: Config) -> str:
    return inside(os.path.abspath(cfg.run.out_dir), "students", student_name(cfg))


class Distiller(nn.Module):
    """Student + method as one module, so one DDP wrapper syncs the student and the method's own parts."""

    def __init__(self, student: nn.Module, method: nn.Module):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x, targets: Targets, labels, epoch: int, precision=None):
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits, stages = self.student.forward_stages(x)
        if logits.dtype != torch.float32:  # losses in fp32 (optim.precision)
            logits, stages = logits.float(), {k: v.float() for k, v in stages.items()}
        terms = self.method(logits, stages, targets, labels, epoch)
        return logits, {**terms, **self.method.logged}


# --------------------------------------------------------------------------------------------------
# the job: what a worker trains


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentJob(Job):
    arch: str
    num_classes: int
    in_chans: int
    method: dict  # the method section
    method_ctx: dict
    optim: OptimSection
    views: int  # K: epoch e reads view e mod K
    data_seed: int
    policy: dict
    mean: tuple
    std: tuple
    n_train: int
    val: Any  # object refs of the splits (raykd.pipeline.data.datasets.Split)
    test: Any
    train: Any = None  # only to render views: online, or a cache without pixels
    cache_fs: Any = None  # cached mode: the cache's filesystem, files per view, columns read
    files: dict | None = None
    columns: tuple = ()
    targets: Any = None  # a TargetReader: the cached teachers' targets (full logits or top-k) as logits
    checks: Any = None  # a cache.PartChecks: each part file's sha256, checked as the job reads it
    refined_files: dict | None = None
    in_memory: bool = True
    device_views: Any = "auto"  # DistillSection.device_views
    shuffle_buffer: int = 0
    test_every: int = 1  # DistillSection.test_every
    online_teachers: tuple = ()  # ({name, arch, path, weights}, ...): run inside the worker
    online_professor: dict | None = None

    def build(self, ctx):
        return StudentTask(self, ctx)

    def datasets(self) -> dict:
        if self.files is None or self.in_memory:
            return {}
        import ray

        return {f"view{k}": ray.data.read_parquet(self.files[k], filesystem=self.cache_fs).select_columns(list(self.columns))
                for k in self.files.used}  # (a view of a cache being built: waited for here)


def _load_online(entries, num_classes, in_chans, device) -> dict[str, nn.Module]:
    from raykd.pipeline.models.checkpoints import load_into, state_from_bytes

    models = {}
    for t in entries:
        m = build_model(t["arch"], num_classes, in_chans, record_preprocess(t))
        load_into(m, state_from_bytes(t["weights"], t["path"]), t["path"], t["arch"])
        models[t["name"]] = m.to(device).eval()
    return models


def _load_professor(p: dict, num_classes: int, device):
    from raykd.methods.professor import Professor
    from raykd.pipeline.models.checkpoints import load_into, state_from_bytes

    prof = Professor(num_classes, p["latent_dim"], p["hidden"], p["temperature"], p["ensemble"])
    load_into(prof, state_from_bytes(p["weights"], p["path"]), p["path"], "professor")
    return prof.to(device).eval()


class StudentTask(Task):
    def __init__(self, job: StudentJob, ctx):
        from raykd.pipeline.data.batches import (
            MemoryEpochs,
            Refined,
            RowFormat,
            StreamEpochs,
            cache_view_loader,
            check_view,
            resolve,
            view_epochs,
            worker_share,
        )

        self.job, self.device = job, ctx.device
        self.student = build_model(job.arch, job.num_classes, job.in_chans)
        self.method = build_method(MethodSection(**job.method), MethodContext(**job.method_ctx))
        self.teachers = _load_online(job.online_teachers, job.num_classes, job.in_chans, ctx.device)
        self.professor = _load_professor(job.online_professor, job.num_classes, ctx.device) if job.online_professor else None
        self.layers = self.method.feature_layers()
        self.cached_teachers = [n for n in job.method_ctx["teachers"] if n not in self.teachers]
        view_of = lambda e: e % job.views  # noqa: E731
        shuffle = job.shuffle_buffer > 0
        rows = job.n_train // ctx.world
        if job.files is None:  # online: views rendered here from the source images
            train = resolve(job.train)
            share = worker_share(len(train), ctx.rank, ctx.world, job.seed)
            policy = _policy(job.policy)
            self.data = view_epochs(train, share, job.data_seed, policy, job.mean, job.std, view_of,
                                    job.optim.batch_size, shuffle, job.seed)
        else:
            fmt = RowFormat(job.mean, job.std, job.policy, job.train)
            refined = Refined(job.cache_fs, job.refined_files, job.checks) if job.refined_files else None
            if job.in_memory:
                load = cache_view_loader(job.cache_fs, job.files, list(job.columns), fmt, ctx.rank, ctx.world, job.seed,
                                         refined, job.checks)
                self.data = MemoryEpochs(load, view_of, job.optim.batch_size, shuffle, job.seed,
                                         finish=None if C.PIXELS in job.columns else fmt.render, device=ctx.device,
                                         device_views=job.device_views, views_used=min(job.views, job.epochs))
            else:
                if ctx.world > 1:
                    source = lambda k: ctx.shard(f"view{k}")  # noqa: E731
                else:
                    import ray

                    source = lambda k: ray.data.read_parquet(job.files[k], filesystem=job.cache_fs).select_columns(  # noqa: E731
                        list(job.columns))
                self.data = StreamEpochs(source, view_of, job.optim.batch_size, job.shuffle_buffer, job.seed, fmt.prepare,
                                         refined, check_view(job.cache_fs, job.files, job.checks))
        steps = max(1, math.ceil(rows / job.optim.batch_size))
        groups = [{"params": list(self.student.parameters())}] + [
            {"params": g["params"], "lr": job.optim.lr * g.get("lr_factor", 1.0)}
            for g in self.method.param_groups() if g["params"]]
        self.opt, self.sched = make_optimizer(groups, job.optim, steps, job.epochs)
        self.evaluator = Evaluator({"val": resolve(job.val), "test": resolve(job.test)}, job.mean, job.std, ctx.device)

    def prepare(self, ctx):
        if ctx.device.type == "cuda":  # the layout to_device gives the inputs there
            self.student.to(memory_format=torch.channels_last)
        self.model = ctx.prepare_model(Distiller(self.student, self.method))
        self.precision = Precision(self.job.optim.precision, ctx.device)
        self.bare = self.model.module if hasattr(self.model, "module") else self.model

    def prepare_epoch(self, epoch):
        self.data.prepare(epoch)

    def batches(self, epoch):
        return self.data(epoch)

    def step(self, batch, epoch):
        from raykd.pipeline.data.batches import to_device

        b = to_device(batch, self.device)
        x, y = b["x"], b["y"]
        cached = self.job.targets(b) if self.job.targets is not None else {}
        if self.teachers:
            targets = Targets()
            with torch.no_grad():
                for n, t in self.teachers.items():
                    targets.logits[n], maps = t.forward_stages(x)
                    targets.features[n] = {s: maps[s] for s in self.layers.get(n, [])}
                if self.professor is not None:
                    targets.refined = self.professor.refine(list(targets.logits.values()), y)
        else:
            targets = Targets(logits={n: cached[n] for n in self.cached_teachers if n in cached},
                              features={n: {s: b[C.feat(n, s)] for s in ss} for n, ss in self.layers.items()})
        if C.REFINED in b:
            targets.refined = b[C.REFINED]
        logits, terms = self.model(x, targets, y, epoch + 1, self.precision)
        optimizer_step(self.opt, self.sched, terms["loss"], self.model.parameters(), self.job.optim.grad_clip,
                       self.precision.scaler)
        return terms, len(y), (logits.argmax(1) == y).sum()

    def evaluate(self, epoch):
        last = epoch + 1 == self.job.epochs
        every = self.job.test_every
        test = last or (every > 0 and (epoch + 1) % every == 0)
        return self.evaluator(self.bare.student, skip=() if test else ("test",))

    def epoch_info(self, epoch):
        return {"view": epoch % self.job.views, "lr": self.sched.get_last_lr()[0],
                "teachers_loaded": len(self.teachers) + (self.professor is not None)}  # 0 when the cache serves

    def state(self):
        return {"student": self.bare.student.state_dict(), "method": self.bare.method.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load(self, state):
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def line(self, m):
        parts = " ".join(f"{k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("train_") and k not in
                         ("train_loss", "train_acc") and not k.startswith("train_w"))  # teacher weights: metrics only
        return (f"view {m['view']} loss {m['train_loss']:.3f} ({parts}) train {m['train_acc']:.4f} "
                f"val {m['val_acc']:.4f}" + (f" test {m['test_acc']:.4f}" if "test_acc" in m else ""))


def _policy(d: dict):
    from raykd.pipeline.data.views import ViewPolicy

    return ViewPolicy(**d)


# --------------------------------------------------------------------------------------------------
# driver: plan a student (no Ray), run its job, write its outputs


def _teacher_sources(cfg: Config, splits, method_cls, online: bool):
    """(teacher names, their val accuracy, K, upstream fingerprint, cache or None, in-worker teacher entries)."""
    from raykd.pipeline.cache import Cache, cache_uri
    from raykd.pipeline.stages.teachers import read_record, teacher_dir

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
        rec = read_record(out, n)
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
    rec = read_student(sdir)
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
    from raykd.pipeline.stages.professor import read_record

    out = os.path.join(os.path.abspath(cfg.run.out_dir), "professor")
    rec = read_record(out)
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
    prev = _reusable(sdir, fp)
    if prev is not None:
        return prev
    return Plan(cfg, student_name(cfg), sdir, fp, upstream, splits, names, online or bool(online_teachers), student,
                method, mctx, views, cache, online_teachers, online_professor)


def make_job(p: Plan, refs, progress, threads: int | None, device: str, concurrent: int = 1) -> StudentJob:
    """The plan as a job: the splits as object refs, the cache's files and columns, in memory or streamed."""
    from raykd.pipeline.data.batches import in_memory_choice, memory_budget, row_bytes
    from raykd.pipeline.harness.raysetup import train_storage

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
        cache_kw = {
            "cache_fs": cache.fs, "files": files, "checks": files.checks,
            "columns": tuple(c for c in cols if c != C.REFINED), "targets": reader,
            "refined_files": refined_files,
            "in_memory": in_memory_choice(d.in_memory, nbytes, memory_budget() // max(1, concurrent)),
            "train": None if cache.manifest["store_views"] else refs["train"],
        }
    else:
        cache_kw = {"train": refs["train"]}
    fault = json.loads(os.environ["RAYKD_FAULT"]) if os.environ.get("RAYKD_FAULT") else None
    splits = p.splits
    return StudentJob(
        kind="distill", name=p.name, run_name=f"student-{p.name}-{p.fp[:12]}", seed=student_seed(cfg),
        epochs=d.optim.epochs, workers=d.workers, storage=train_storage(cfg), device=device, torch_threads=threads,
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
    write_record(os.path.join(p.sdir, RECORD), rec)
    return rec


def read_student(sdir: str) -> dict | None:
    """A student's record (None if it has none; an error naming it if it is not one)."""
    try:
        return load_record(os.path.join(sdir, RECORD), StudentRecord, "student record")
    except RaykdError as e:
        raise RaykdError(f"{e}; move its folder away to train it again") from None


def _reusable(sdir: str, fp: str) -> dict | None:
    """The student's record if it is of this fingerprint and its files are intact."""
    prev = read_student(sdir)
    return prev if prev is not None and prev["fingerprint"] == fp and _outputs_intact(sdir, prev) else None


def _outputs_intact(sdir: str, rec: dict) -> bool:
    try:
        return all(sha256_file(os.path.join(sdir, f)) == sha for f, sha in rec["files"].items())
    except (OSError, KeyError):
        return False


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


def _say(queue, line: str) -> None:
    """A console line: printed here, or sent to the driver when this runs in a Tune trial (`raykd sweep`)."""
    if queue is None:
        log.info(line)
    else:
        from raykd.pipeline.core.progress import emit

        emit(queue, line)


class _Students:
    """Plans, runs and finishes a list of students: each config's chain (Method.chain) in turn, the chains
    side by side, `parallel` jobs at a time; a student that fails does not stop the others."""

    def __init__(self, cfgs: list[Config], parallel: int, say, inline: bool, tune: bool, threads_share: int,
                 stack: contextlib.ExitStack, concurrent: int = 1):
        # say: the progress queue of the driver when this is a Tune trial, where every line goes; else None:
        # the driver's lines are printed here, the jobs' sent to a ProgressPrinter made with the first job
        self.cfgs, self.progress, self.inline, self.tune, self.stack = cfgs, say, inline, tune, stack
        self._queue = say
        self.runner = JobRunner(parallel, inline=inline, tune=tune)
        self.threads_share = threads_share
        self.concurrent = concurrent  # jobs on this machine at once: its memory is shared between them
        self.splits: dict[str, Any] = {}
        self.refs: dict[str, dict] = {}
        self.records: list[dict | None] = [None] * len(cfgs)
        self.errors: dict[int, BaseException] = {}
        self.device: str | None = None

    @property
    def queue(self):
        if self._queue is None:
            from raykd.pipeline.core.progress import Console

            self._queue = Console() if self.inline else self.stack.enter_context(ProgressPrinter()).queue
        return self._queue

    def _splits(self, cfg: Config):
        from raykd.pipeline.data.datasets import load_splits

        key = cfg.data.model_dump_json()
        if key not in self.splits:
            self.splits[key] = load_splits(cfg.data)
        return self.splits[key]

    def _refs(self, cfg: Config, splits) -> dict:
        """The splits as the jobs get them: themselves in this process, else Ray object refs (put once)."""
        if self.inline:
            return {k: getattr(splits, k) for k in ("train", "val", "test")}
        import ray

        key = cfg.data.model_dump_json()
        if key not in self.refs:
            self.refs[key] = {k: ray.put(getattr(splits, k)) for k in ("train", "val", "test")}
        return self.refs[key]

    def start(self, i: int, chain: list[Config], done: list[dict]) -> None:
        """Plan the next student of config i's chain and submit its job (or take its finished record)."""
        from raykd.pipeline.harness.raysetup import init_ray, resolve_device

        while True:
            cfg = chain[len(done)]
            t = time.perf_counter()
            try:
                splits = self._splits(cfg)
                t_plan = time.perf_counter()
                plan = plan_student(cfg, splits)
            except Exception as e:  # noqa: BLE001  (bad input for this student only; reported at the end)
                self.errors[i] = e
                return
            if isinstance(plan, dict):
                sdir = student_dir(cfg)  # its folder's name: a renamed folder keeps its record's
                _say(self.progress, f"[distill] {os.path.basename(sdir)}: up to date ({sdir}), not retrained")
                done.append(plan)
                if len(done) == len(chain):
                    return self._chain_done(i, chain, done)
                continue
            break
        plan.times = {"data_s": t_plan - t, "plan_s": time.perf_counter() - t_plan}
        t = time.perf_counter()
        if not self.inline:
            init_ray(cfg)
        if self.device is None:
            self.device = resolve_device(cfg.run.device)
        d = cfg.distill
        threads = d.workers.torch_threads or self.threads_share
        try:
            job = make_job(plan, self._refs(cfg, plan.splits), self.queue, threads, self.device,
                           self.runner.parallel * self.concurrent)
        except Exception as e:  # noqa: BLE001  (a cache without what this student reads)
            self.errors[i] = e
            return
        if not job.in_memory:  # streamed views: Ray Data reads them, in this process too
            init_ray(cfg)
        plan.times["ray_init_s"] = time.perf_counter() - t
        if not self.inline:  # refused before anything is written, rather than queued for ever
            check_fits({"CPU": d.workers.cpus_per_worker, "GPU": d.workers.gpus_per_worker if self.device == "cuda" else 0},
                       "distill.workers.cpus_per_worker/gpus_per_worker")
        try:  # one process trains a student at a time; it may have finished it meanwhile
            self.stack.enter_context(output_lock(plan.sdir, f"training of student {plan.name!r}"))
            rec = _reusable(plan.sdir, plan.fp)
        except RaykdError as e:
            self.errors[i] = e
            return
        if rec is not None:
            _say(self.progress, f"[distill] {plan.name}: up to date ({plan.sdir}), trained meanwhile by another process")
            done.append(rec)
            return self._chain_done(i, chain, done) if len(done) == len(chain) else self.start(i, chain, done)
        write_resolved(cfg, plan.sdir)

        def on_start():
            plan.t0 = time.time()
            _say(self.progress, f"[distill] {plan.name}: {cfg.method.name} -> {d.student.arch} "
                 f"({plan.student.num_params():,} params), {'teachers online' if plan.online else 'from the cache'}"
                 f"{' ' + str(plan.teachers) if plan.teachers else ''}, {d.optim.epochs} epochs over K={plan.views} "
                 f"views, {d.workers.num_workers} worker(s), {'in memory' if job.in_memory else 'streamed'}")

        def on_done(out):
            if isinstance(out, JobFailed):
                self.errors[i] = StageFailed(failure_message(out))
                return
            try:
                rec = finish_student(plan, out)
            except Exception as e:  # noqa: BLE001
                self.errors[i] = e
                return
            _say(self.progress, f"[distill] {plan.name}: done, val {rec['val_acc']:.4f} test {rec['test_acc']:.4f} "
                 f"-> {plan.sdir}")
            done.append(rec)
            if len(done) == len(chain):
                self._chain_done(i, chain, done)
            else:
                self.start(i, chain, done)

        self.runner.submit(job, on_done, on_start)

    def _chain_done(self, i: int, chain: list[Config], done: list[dict]) -> None:
        rec = METHODS.get(chain[-1].method.name).summarise(done, student_dir(chain[-1]))
        if len(done) > 1:
            for line in METHODS.get(rec["method"]).notes(rec):
                _say(self.progress, f"[distill] {line}")
        self.records[i] = rec

    def run(self) -> None:
        for i, cfg in enumerate(self.cfgs):
            chain = [variant(cfg, changes, "method chain") for changes in
                     METHODS.get(cfg.method.name).chain(cfg, student_name(cfg))]
            self.start(i, chain, [])
        self.runner.run()


def run_students(cfgs: list[Config], parallel: int | None = None, *, progress=None, tune: bool = False,
                 concurrent: int = 1) -> list[dict]:
    """Distil several students (`raykd run`), `parallel` jobs at a time (default: as many as the cores fit);
    returns their records. A failed student does not stop the others; the failures are reported together
    at the end (exit 1). `tune`: this is a Ray Tune trial (`raykd sweep`): its jobs run in this process,
    reporting every epoch to Tune; `concurrent` trials share the node's cores."""
    from raykd.pipeline.harness.raysetup import (
        concurrent_jobs,
        in_process,
        init_ray,
        local_thread_share,
    )

    for out in {c.run.out_dir: c for c in cfgs}.values():
        out_root(out)  # usable, before anything starts
    w = cfgs[0].distill.workers
    if tune or len(cfgs) == 1:
        parallel = 1
    elif parallel is None:
        init_ray(cfgs[0])
        parallel = concurrent_jobs(cfgs[0].ray, w.cpus_per_worker * w.num_workers, w.num_workers)
    parallel = max(1, min(parallel, len(cfgs)))
    share = local_thread_share(cfgs[0].ray, parallel * concurrent * w.num_workers)
    if len(cfgs) > 1:
        log.info(f"[distill] {len(cfgs)} students, {parallel} at a time")
    with contextlib.ExitStack() as stack:
        s = _Students(cfgs, parallel, progress, tune or in_process(cfgs[0], parallel, w), tune, share, stack, concurrent)
        s.run()
    if len(cfgs) == 1 and s.errors:
        raise s.errors[0]
    if s.errors:
        failed = {}
        for i, e in sorted(s.errors.items()):
            failed[student_name(cfgs[i])] = (str(e) if isinstance(e, RaykdError) else
                                             (str(e).strip().splitlines() or [type(e).__name__])[-1])
        raise StageFailed("some students failed (the others are saved):\n  " + "\n  ".join(
            f"{n}: {msg}" for n, msg in failed.items()), failed, s.records)
    return s.records


def run_distill(cfg: Config, progress=None, concurrent: int = 1, tune: bool = False) -> dict:
    """Distil one student as configured; returns its record (also written as student.json).

    `progress`: the driver's progress queue when this runs in a Tune trial next to `concurrent - 1`
    others (`raykd sweep`), whose jobs share the node's cores; `tune`: report each epoch to Tune."""
    return run_students([cfg], 1, progress=progress, tune=tune, concurrent=concurrent)[0]
