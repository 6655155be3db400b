"""A student's training job: the module it trains (`Distiller`: the student and the method's own modules),
the job's fields (`StudentJob`) and the task that runs it on the shared loop (`StudentTask`): its epochs
from the cache (in memory or streamed) or with the teachers online, its losses, its evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from raykd.methods import MethodContext, Targets, build_method
from raykd.pipeline.cache import columns as C
from raykd.pipeline.core.config import MethodSection
from raykd.pipeline.core.sections import OptimSection
from raykd.pipeline.harness.job import Job, Task
from raykd.pipeline.harness.training import Evaluator, Precision, make_optimizer, optimizer_step
from raykd.pipeline.models.zoo import build_model, record_preprocess


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
    cache_views: Any = None  # cached mode: the CacheViews it reads (None: online)
    targets: Any = None  # a TargetReader: the cached teachers' targets (full logits or top-k) as logits
    device_views: Any = "auto"  # DistillSection.device_views
    shuffle_buffer: int = 0
    test_every: int = 1  # DistillSection.test_every
    online_teachers: tuple = ()  # ({name, arch, path, weights}, ...): run inside the worker
    online_professor: dict | None = None

    def build(self, ctx):
        return StudentTask(self, ctx)

    @property
    def in_memory(self) -> bool:  # online views are rendered in memory too
        return self.cache_views is None or self.cache_views.in_memory

    def datasets(self) -> dict:
        return {} if self.cache_views is None else self.cache_views.datasets()  # (a view of a cache being built: waited for here)


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
        from raykd.pipeline.cache.epochs import RowFormat, resolve, view_epochs, worker_share

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
        if job.cache_views is None:  # online: views rendered here from the source images
            train = resolve(job.train)
            share = worker_share(len(train), ctx.rank, ctx.world, job.seed)
            policy = _policy(job.policy)
            self.data = view_epochs(train, share, job.data_seed, policy, job.mean, job.std, view_of,
                                    job.optim.batch_size, shuffle, job.seed)
        else:
            fmt = RowFormat(job.mean, job.std, job.policy, job.train)
            self.data = job.cache_views.epochs(
                ctx, view_of, job.optim.batch_size, shuffle, job.seed, fmt.prepare,
                memory_prepare=lambda raw: fmt.prepare(raw, defer=True), shuffle_buffer=job.shuffle_buffer,
                finish=None if C.PIXELS in job.cache_views.columns else fmt.render, device=ctx.device,
                device_views=job.device_views, views_used=min(job.views, job.epochs))
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
        from raykd.pipeline.cache.epochs import to_device

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
