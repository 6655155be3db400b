"""`raykd teachers`: train each teacher on the shared harness (raykd.pipeline.harness.loop), or evaluate a given checkpoint.

Output per teacher under <out_dir>/teachers/<name>/: best.safetensors (by val accuracy),
last.safetensors, metrics.jsonl and teacher.json (arch, sha256 of both files, val/test accuracy,
the accuracy gate, fingerprint). A teacher whose record matches its fingerprint is not retrained.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import torch

from raykd.pipeline.core.config import Config, write_resolved
from raykd.pipeline.core.errors import CheckpointError, ConfigError, RaykdError, StageFailed
from raykd.pipeline.core.log import log
from raykd.pipeline.core.records import StageRecord, TeacherRecord, inside, out_root, output_lock, write_record
from raykd.pipeline.core.sections import OptimSection, TeacherSpec
from raykd.pipeline.data.splits import Splits, load_splits
from raykd.pipeline.harness.job import Job, Task
from raykd.pipeline.harness.tracking import tracking_spec
from raykd.pipeline.harness.training import Evaluator, Precision, evaluate, make_optimizer, optimizer_step
from raykd.pipeline.models.checkpoints import (
    load_foreign,
    load_into,
    load_state_dict,
    resolve_checkpoint,
    save_state_dict,
    sha256_file,
)
from raykd.pipeline.models.plugins import job_imports
from raykd.pipeline.models.sources import is_source_ref
from raykd.pipeline.models.zoo import Preprocess, build_model, record_preprocess

RECORD = "teacher.json"


def teacher_dir(out_dir: str, name: str) -> str:
    return inside(out_dir, "teachers", name)


def teacher_record(tdir: str) -> StageRecord:
    """A teacher's record (teacher.json) and its best and last checkpoints; one that is unreadable or of
    another shape is an error naming it, never a reason to train over the files it describes."""
    return StageRecord(os.path.join(tdir, RECORD), TeacherRecord, "teacher record",
                       files=lambda r: {r[k]["file"]: r[k]["sha256"] for k in ("best", "last") if k in r},
                       again=f"move its folder away to train teacher {os.path.basename(tdir)!r} again",
                       error=CheckpointError)


def teacher_fingerprint(spec: TeacherSpec, cfg: Config, data_fp: str) -> str:
    path = _checkpoint_path(spec.checkpoint)
    ckpt_sha = sha256_file(path) if path and os.path.isfile(path) else None
    payload = {
        "data": data_fp,
        # fields added later are left out at their defaults: teachers from before them keep their fingerprints
        "spec": spec.model_dump(mode="json", exclude={k for k in ("checkpoint_key_map", "image_size", "mean", "std")
                                                      if not getattr(spec, k)}),
        "checkpoint_sha256": ckpt_sha,
        "optim": None if spec.checkpoint else cfg.teachers.optim.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _checkpoint_path(ref: str | None) -> str | None:
    try:
        return resolve_checkpoint(ref) if ref else None
    except CheckpointError:
        return None  # said when the teacher is evaluated


# --------------------------------------------------------------------------------------------------
# the job: one teacher's training


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherJob(Job):
    arch: str
    num_classes: int
    in_chans: int
    optim: OptimSection
    lr: float
    policy: dict
    data_seed: int
    mean: tuple
    std: tuple
    preprocess: dict | None  # the teacher's own input size and normalisation (TeacherSpec.preprocess)
    train: Any  # object refs of the splits (raykd.pipeline.data.datasets.Split)
    val: Any
    test: Any

    def build(self, ctx):
        return TeacherTask(self, ctx)


class TeacherTask(Task):
    """CE on view e of every training sample in epoch e; keeps the best epoch (by val accuracy) in its state."""

    optim_key = "teachers.optim"

    def __init__(self, job: TeacherJob, ctx):
        from raykd.pipeline.cache.epochs import resolve, view_epochs, worker_share
        from raykd.pipeline.data.views import ViewPolicy

        self.job, self.device = job, ctx.device
        self.model = build_model(job.arch, job.num_classes, job.in_chans, Preprocess.of(job.preprocess, job.mean, job.std))
        train = resolve(job.train)
        share = worker_share(len(train), ctx.rank, ctx.world, job.seed)
        policy = ViewPolicy(**job.policy)
        self.data = view_epochs(train, share, job.data_seed, policy, job.mean, job.std, lambda e: e,
                                job.optim.batch_size, True, job.seed, keep=False)
        steps = max(1, math.ceil(len(share) / job.optim.batch_size))
        self.opt, self.sched = make_optimizer(self.model.parameters(), job.optim, steps, job.epochs, job.lr)
        self.evaluator = Evaluator({"val": resolve(job.val), "test": resolve(job.test)}, job.mean, job.std, ctx.device)
        self.best: dict | None = None  # {"model", "epoch", "val_acc"} of the best epoch so far; "test_acc" at the end
        self.epoch = 0

    def prepare(self, ctx):
        self.net = ctx.prepare_model(self.model)
        self.precision = Precision(self.job.optim.precision, ctx.device)
        self.bare = self.net.module if hasattr(self.net, "module") else self.net

    def prepare_epoch(self, epoch):
        self.epoch = epoch
        self.data.prepare(epoch)

    def batches(self, epoch):
        return self.data(epoch)

    def step(self, batch, epoch):
        x, y = batch["x"].to(self.device, non_blocking=True), batch["y"].to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer_step(self.opt, self.sched, loss, self.net.parameters(), self.job.optim.grad_clip, self.precision.scaler)
        return {"loss": loss}, len(y), (logits.argmax(1) == y).sum()

    def evaluate(self, epoch):
        """Validation after every epoch; the test split once, after the last, on the best epoch's weights
        (`best_test_acc`): what the record reports, and nothing chooses by it."""
        m = self.evaluator(self.bare, skip=("test",))
        if self.best is None or m["val_acc"] >= self.best["val_acc"]:  # ties: the later epoch
            self.best = {"model": {k: v.detach().cpu().clone() for k, v in self.bare.state_dict().items()},
                         "epoch": self.epoch + 1, "val_acc": m["val_acc"]}
        if epoch + 1 == self.job.epochs:
            best = copy.deepcopy(self.bare)
            best.load_state_dict(self.best["model"])
            t = self.evaluator(best, skip=("val",))
            self.best["test_acc"] = m["best_test_acc"] = t["test_acc"]
        return m

    def epoch_info(self, epoch):
        return {"lr": self.sched.get_last_lr()[0]}

    def state(self):
        return {"model": self.bare.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "best": self.best}

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.best = state["best"]

    def line(self, m):
        best = f" best epoch's test {m['best_test_acc']:.4f}" if "best_test_acc" in m else ""
        return f"loss {m['train_loss']:.3f} val {m['val_acc']:.4f}{best}"


# --------------------------------------------------------------------------------------------------
# driver


def run_teachers(cfg: Config) -> list[dict]:
    """Train or load every configured teacher; returns their records (also written as teacher.json).

    Teachers to train run as concurrent jobs (`teachers.parallel` at a time, each in a Ray task; a lone
    one in this process); each record is written as soon as its job ends.
    """
    splits = load_splits(cfg.data)
    out = out_root(cfg)
    with output_lock(os.path.join(out, "teachers"), f"`raykd teachers` of {out}"):
        return _run_teachers(cfg, splits, out)


def _run_teachers(cfg: Config, splits: Splits, out: str) -> list[dict]:
    found = {spec.name: teacher_record(teacher_dir(out, spec.name)).read() for spec in cfg.teachers.models}  # all checked before any write
    records: dict[str, dict] = {}
    to_train: list[tuple[TeacherSpec, str]] = []
    for spec in cfg.teachers.models:
        tdir = teacher_dir(out, spec.name)
        fp = teacher_fingerprint(spec, cfg, splits.fingerprint)
        rec = found[spec.name]
        if rec is not None and rec.get("fingerprint") == fp and teacher_record(tdir).intact(rec):
            log.info(f"[teachers] {spec.name}: up to date ({tdir}), not retrained")
        elif spec.checkpoint:
            log.info(f"[teachers] {spec.name} ({spec.arch}): evaluating {spec.checkpoint}")
            t0 = time.time()
            rec = _evaluate_given(spec, splits, _local_device(cfg.run.device), tdir)
            rec["wall_time_s"] = round(time.time() - t0, 2)
        else:
            to_train.append((spec, fp))
            continue
        records[spec.name] = _finalise(rec, spec, fp, splits, cfg, tdir)
    write_resolved(cfg, os.path.join(out, "teachers"))
    if to_train:
        records.update(_train_all(cfg, splits, out, to_train))
    ordered = [records[s.name] for s in cfg.teachers.models]
    write_record(os.path.join(out, "teachers", "summary.json"), ordered)
    return ordered


def _train_all(cfg: Config, splits: Splits, out: str, to_train) -> dict[str, dict]:
    from raykd.pipeline.harness.driver import StageDriver
    from raykd.pipeline.harness.placement import Placement, queue_of

    w = cfg.teachers.workers
    place = Placement.decide(cfg, w, jobs=len(to_train), parallel=cfg.teachers.parallel)
    device = place.start()
    refs = place.put("splits", {k: getattr(splits, k) for k in ("train", "val", "test")})
    drive = StageDriver(place, failed=lambda name, e: log.error(f"[teachers] {name}: FAILED: {e}"))
    with place.progress() as progress:
        for spec, fp in to_train:
            job = TeacherJob(
                kind="teacher", name=spec.name, run_name=f"teacher-{spec.name}-{fp[:12]}", seed=spec.seed,
                epochs=spec.epochs or cfg.teachers.optim.epochs, workers=w, storage=place.storage, device=device,
                torch_threads=place.threads(), progress=queue_of(progress), arch=spec.arch, num_classes=splits.num_classes,
                in_chans=splits.in_chans, optim=cfg.teachers.optim, lr=spec.lr or cfg.teachers.optim.lr,
                policy=splits.policy.as_dict(), data_seed=cfg.data.seed, mean=splits.mean, std=splits.std,
                preprocess=spec.preprocess(), imports=job_imports(cfg),
                tracking=tracking_spec(cfg, "teachers", spec.name, f"teacher-{spec.name}-{fp[:12]}"), **refs)

            def finish(res, seconds, spec=spec, fp=fp):
                tdir = teacher_dir(out, spec.name)
                rec = _finish_trained(spec, splits, tdir, res.state["task"], res.history)
                rec["wall_time_s"] = round(seconds, 2)
                rec = _finalise(rec, spec, fp, splits, cfg, tdir)
                log.info(f"[teachers] {spec.name}: done, val {rec['val_acc']:.4f} test {rec['test_acc']:.4f}")
                return rec

            drive.submit(spec.name, job, finish, start=lambda spec=spec, job=job: log.info(
                f"[teachers] {spec.name} ({spec.arch}): training, {job.epochs} epochs, {w.num_workers} worker(s)"))
        records = drive.run()
    if drive.errors:
        raise StageFailed(f"teacher training failed for {', '.join(drive.errors)} (above); the others are saved")
    return records


def _finalise(rec: dict, spec: TeacherSpec, fp: str, splits: Splits, cfg: Config, tdir: str) -> dict:
    rec.update(fingerprint=fp, data_fingerprint=splits.fingerprint, num_classes=splits.num_classes,
               in_chans=splits.in_chans, image_size=splits.image_size)
    if spec.preprocess():  # with the data set's statistics it undoes: a record alone rebuilds the teacher's input
        rec["preprocess"] = {**spec.preprocess(), "data_mean": list(splits.mean), "data_std": list(splits.std)}
    rec = _apply_gate(rec, cfg.teachers.min_val_acc)
    teacher_record(tdir).write(rec)
    return rec


def _local_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but this machine has no GPU; use run.device=cpu or auto")
    return "cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu"


def _finish_trained(spec, splits, tdir, state: dict, history: list[dict]) -> dict:
    os.makedirs(tdir, exist_ok=True)
    with open(os.path.join(tdir, "metrics.jsonl"), "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")
    best = state["best"]
    model = build_model(spec.arch, splits.num_classes, splits.in_chans)
    model.load_state_dict(best["model"])
    return {
        "name": spec.name, "arch": spec.arch, "seed": spec.seed, "source": "trained",
        "params": model.num_params(),
        "best": {"file": "best.safetensors", "sha256": save_state_dict(best["model"], os.path.join(tdir, "best.safetensors")),
                 "epoch": best["epoch"]},
        "last": {"file": "last.safetensors", "sha256": save_state_dict(state["model"], os.path.join(tdir, "last.safetensors")),
                 "epoch": history[-1]["epoch"]},
        "val_acc": best["val_acc"], "test_acc": best["test_acc"], "epochs": len(history),
    }


def _evaluate_given(spec, splits, device, tdir) -> dict:
    model = build_model(spec.arch, splits.num_classes, splits.in_chans, Preprocess.of(spec.preprocess(), splits.mean, splits.std))
    try:
        path = resolve_checkpoint(spec.checkpoint)
        load_foreign(model, load_state_dict(path), path, spec.arch, spec.checkpoint_key_map)
    except CheckpointError as e:
        hint = ""
        if "size mismatch for" in str(e):
            hint = f" (the data set {splits.name} has {splits.num_classes} classes, {splits.in_chans} channel(s))"
        raise CheckpointError(f"teacher {spec.name!r} (teachers.models[].checkpoint): {e}{hint}") from None
    model.to(device)
    val_acc, _ = evaluate(model, splits.val.images, splits.val.labels, splits.mean, splits.std, device)
    test_acc, _ = evaluate(model, splits.test.images, splits.test.labels, splits.mean, splits.std, device)
    sha = save_state_dict(model.state_dict(), os.path.join(tdir, "best.safetensors"))  # in raykd's own keys
    return {"name": spec.name, "arch": spec.arch, "seed": spec.seed,
            "source": spec.checkpoint if is_source_ref(spec.checkpoint) else os.path.abspath(spec.checkpoint),
            "source_sha256": sha256_file(path), "params": model.num_params(),
            "best": {"file": "best.safetensors", "sha256": sha}, "val_acc": val_acc, "test_acc": test_acc}


def _apply_gate(rec: dict, min_val_acc: float) -> dict:
    rec["gate"] = {"min_val_acc": min_val_acc, "passed": rec["val_acc"] >= min_val_acc}
    return rec


def load_teacher(out_dir: str, name: str, for_cache: bool = True) -> tuple[torch.nn.Module, dict]:
    """The best checkpoint of a teacher, verified against its sha256; refused if it failed the accuracy gate."""
    rec = teacher_record(teacher_dir(out_dir, name)).read()
    if rec is None:
        raise RaykdError(f"teacher {name!r} has no record under {teacher_dir(out_dir, name)}: run `raykd teachers` first")
    if for_cache and not rec["gate"]["passed"]:
        raise RaykdError(
            f"teacher {name!r} is below the accuracy gate (val {rec['val_acc']:.4f} < teachers.min_val_acc "
            f"{rec['gate']['min_val_acc']}) and may not be cached")
    path = os.path.join(teacher_dir(out_dir, name), rec["best"]["file"])
    model = build_model(rec["arch"], rec["num_classes"], rec["in_chans"], record_preprocess(rec))
    load_into(model, load_state_dict(path, rec["best"]["sha256"]), path, rec["arch"])
    return model.eval(), rec


def format_table(records: list[dict]) -> str:
    head = f"{'teacher':<12} {'arch':<11} {'params':>9} {'val acc':>8} {'test acc':>9} {'time s':>7}  gate"
    rows = [head, "-" * len(head)]
    for r in records:
        gate = "ok" if r["gate"]["passed"] else f"REFUSED (< {r['gate']['min_val_acc']:.2f})"
        rows.append(f"{r['name']:<12} {r['arch']:<11} {r['params']:>9,} {100 * r['val_acc']:>7.2f}% "
                    f"{100 * r['test_acc']:>8.2f}% {r.get('wall_time_s', 0):>7.1f}  {gate}")
    return "\n".join(rows)
