"""`raykd professor`: train the CAAE professor on the cached teacher targets, then add a `refined` column.

Training is a job of the shared harness (raykd.pipeline.harness.loop) reading only the cache's labels and teacher
logits (no teacher runs), one view partition per epoch. The refined column is then written by a Ray Data actor pool over the cache
into its own files, `refined/view=k/*.parquet` (sample_id, view_id, refined), keyed by
(sample_id, view_id); the teachers' part files are never rewritten. The manifest, rewritten last,
records the professor (checkpoint sha256, config, fingerprint chained on the cache's, its files and
the refined targets' accuracy). Outputs under <out_dir>/professor/: professor.safetensors,
professor.json, metrics.jsonl, config.resolved.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import time

import numpy as np
import torch
import torch.nn.functional as F

from raykd.methods.professor import Professor, professor_losses, teacher_probs
from raykd.pipeline.cache import (
    MANIFEST,
    REFINED,
    Cache,
    CacheError,
    TargetReader,
    cache_uri,
    column_array,
    describe_files,
    load_refined,
    view_dir,
    write_json,
)
from raykd.pipeline.cache import columns as C
from raykd.pipeline.cache.epochs import CacheViews
from raykd.pipeline.core.config import Config, write_resolved
from raykd.pipeline.core.log import log
from raykd.pipeline.core.records import ProfessorRecord, StageRecord, out_root, output_lock
from raykd.pipeline.harness.job import Job, Task
from raykd.pipeline.harness.tracking import tracking_spec
from raykd.pipeline.models.checkpoints import load_into, read_verified, save_state_dict, state_from_bytes
from raykd.pipeline.models.plugins import job_imports

RECORD = "professor.json"


def professor_fingerprint(cache_fp: str, cfg: Config) -> str:
    p = cfg.professor.model_dump(mode="json", exclude={"workers", "actors", "cpus_per_actor"})
    return hashlib.sha256(json.dumps({"cache": cache_fp, "professor": p}, sort_keys=True).encode()).hexdigest()


def _build(lc: dict) -> Professor:
    return Professor(lc["num_classes"], lc["latent_dim"], lc["hidden"], lc["temperature"], lc["ensemble"])


def held_out(sample_ids: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Which samples the professor never trains on (`professor.holdout`): a seeded hash of the sample id
    (splitmix64), so every worker, batch and view agrees without a list."""
    x = np.asarray(sample_ids).astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < share


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfessorJob(Job):
    lc: dict  # the professor's sizes, target sources (teachers), loss weights and optimiser
    targets: TargetReader  # the sources' stored columns, and how they become logits
    views: CacheViews  # the views it trains on (labels and the teachers' targets)

    def build(self, ctx):
        return ProfessorTask(self, ctx)

    def datasets(self) -> dict:
        return self.views.datasets()


class ProfessorTask(Task):
    """The professor's training: cached teacher logits and labels only, one view partition per epoch."""

    prefix = ""  # its metrics are loss, rec, cls, adv_z, adv_q, refined_acc, fixed_acc, d_loss
    optim_key = "professor.optim"

    def __init__(self, job: ProfessorJob, ctx):
        from raykd.pipeline.data.datasets import as_tensor

        lc = job.lc
        self.job, self.ctx, self.lc = job, ctx, lc
        self.prof = _build(lc).to(ctx.device)
        self.opt_g = torch.optim.Adam(self.prof.generator_parameters(), lr=lc["lr"])
        self.opt_d = torch.optim.Adam(self.prof.discriminator_parameters(), lr=lc["lr"])
        view_of = lambda e: e % lc["views"]  # noqa: E731

        def prepare(raw):  # the targets as logits (top-k rebuilt), per source; held-out samples dropped
            keep = ~held_out(np.asarray(raw["sample_id"]), lc["holdout"], lc["seed"])
            raw = {c: np.asarray(v)[keep] for c, v in raw.items()}
            return {"y": as_tensor(raw["label"]).long(), **{C.logits(s): z for s, z in job.targets(raw).items()}}

        self.data = job.views.epochs(ctx, view_of, lc["batch_size"], True, job.seed, prepare)

    def _sync(self, params) -> None:
        """Several workers: average their gradients (the professor is not wrapped in DDP)."""
        if self.ctx.world > 1:
            for p in params:
                if p.grad is not None:
                    self.ctx.all_reduce(p.grad)
                    p.grad /= self.ctx.world

    def prepare_epoch(self, epoch):
        self.data.prepare(epoch)

    def batches(self, epoch):
        return self.data(epoch)

    def step(self, batch, epoch):
        dev = self.ctx.device
        y = batch["y"].to(dev)
        terms, d_loss = professor_losses(self.prof, [batch[C.logits(t)].to(dev) for t in self.lc["teachers"]], y,
                                         **self.lc["weights"])
        self.opt_g.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self._sync(self.prof.generator_parameters())
        self.opt_g.step()
        self.opt_d.zero_grad(set_to_none=True)  # drops what the generator's loss left on the discriminators
        d_loss.backward()
        self._sync(self.prof.discriminator_parameters())
        self.opt_d.step()
        return {**terms, "d_loss": d_loss}, len(y), None

    def state(self):
        return {"professor": self.prof.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load(self, state):
        self.prof.load_state_dict(state["professor"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def line(self, m):
        return (f"loss {m['loss']:.4f} (rec {m['rec']:.4f} cls {m['cls']:.4f} adv_z {m['adv_z']:.3f} "
                f"adv_q {m['adv_q']:.3f} d {m['d_loss']:.3f}) refined acc {m['refined_acc']:.4f} "
                f"(teacher-wrong fixed {m['fixed_acc']:.4f})")


class RefineForward:
    """The actor pool's callable: loads the professor once, adds the refined column (tau * r, fp16)."""

    def __init__(self, lc: dict, targets: TargetReader, path: str, weights: bytes, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.teachers, self.targets = lc["teachers"], targets
        self.prof = _build(lc)
        load_into(self.prof, state_from_bytes(weights, path), path, "professor")
        self.prof.eval()

    def __call__(self, batch: dict) -> dict:
        z = self.targets(batch)
        logits = [z[t] for t in self.teachers]
        refined = self.prof.refine(logits, torch.from_numpy(batch["label"].astype(np.int64)))
        return {"sample_id": batch["sample_id"], "view_id": batch["view_id"], "view": batch["view_id"].copy(),
                C.REFINED: refined.half().numpy()}


def run_professor(cfg: Config) -> dict:
    """Train (or reuse) the professor and add (or keep) the cache's refined column; returns the manifest entry."""
    uri = cache_uri(cfg)
    cache = Cache(uri, cfg.cache.s3_endpoint)
    m = cache.manifest
    fp = professor_fingerprint(m["fingerprint"], cfg)
    if (m.get("professor") or {}).get("fingerprint") == fp:
        log.info(f"[professor] {uri}: refined column up to date (fingerprint {fp[:12]}), reused")
        return m["professor"]
    out = os.path.join(out_root(cfg), "professor")
    with output_lock(out, "run of the professor"):
        return _run(cfg, uri, cache, fp, out)


def _run(cfg: Config, uri: str, cache: Cache, fp: str, out: str) -> dict:
    from raykd.pipeline.harness.raysetup import check_fits, init_ray, local_thread_share, resolve_device

    m = cache.manifest
    p = cfg.professor
    write_resolved(cfg, out)
    lc = {"num_classes": m["dataset"]["num_classes"], "latent_dim": p.latent_dim, "hidden": p.hidden,
          "temperature": p.temperature, "ensemble": p.ensemble, "holdout": p.holdout, "seed": p.seed,
          "teachers": cache.sources, "views": m["views"],
          "batch_size": p.optim.batch_size, "lr": p.optim.lr,
          "weights": {"w_rec": p.w_rec, "w_cls": p.w_cls, "w_z": p.w_z, "w_q": p.w_q}}
    rec = professor_record(out).read()
    init_ray(cfg)  # before ray.data is imported: it reads raykd's logging settings then
    import ray
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    device = resolve_device(cfg.run.device)
    if rec is None or rec.get("fingerprint") != fp or not professor_record(out).intact(rec):
        rec = _train(cfg, cache, lc, fp, out, device)

    # the refine pass: a Ray Data actor pool over every view, into refined/view=k/
    t0 = time.time()
    fs, root = cache.fs, cache.root
    pdir = posixpath.join(root, REFINED)
    if m.get("professor"):  # uncommit the professor this one replaces before deleting its files
        write_json(fs, posixpath.join(root, MANIFEST), _without_professor(m))
    if fs.exists(pdir):
        fs.rm(pdir, recursive=True)
    ray.data.DataContext.get_current().arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    files = [f for k in range(m["views"]) for f in cache.view_files(k)]
    targets = cache.target_reader()
    cols = ["sample_id", "view_id", "label", *targets.all_columns]
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    res = {"num_gpus": 1} if device == "cuda" else {}
    check_fits({"CPU": p.cpus_per_actor, "GPU": res.get("num_gpus", 0)}, "professor.cpus_per_actor")
    ds = ds.map_batches(RefineForward, batch_format="numpy", batch_size=1024,
                        compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus_per_actor, **res,
                        fn_constructor_kwargs={"lc": lc, "targets": targets, "path": os.path.join(out, rec["file"]),
                                               "weights": read_verified(os.path.join(out, rec["file"]), rec["sha256"]),
                                               "threads": local_thread_share(cfg.ray, p.actors)})
    log.info(f"[professor] writing the refined column of {m['rows']} rows into {pdir}")
    ds.write_parquet(pdir, filesystem=fs, partition_cols=["view"], min_rows_per_file=cfg.cache.rows_per_file,
                     compression="zstd")
    fs.invalidate_cache()
    pfiles = []
    for k in range(m["views"]):
        vf = describe_files(fs, root, view_dir(root, k, REFINED))
        if sum(f["rows"] for f in vf) != m["dataset"]["train_samples"]:
            raise CacheError(f"professor: view {k} got {sum(f['rows'] for f in vf)} refined rows, expected "
                             f"{m['dataset']['train_samples']}; not committed")
        pfiles += vf
    entry = {"fingerprint": fp, "checkpoint_sha256": rec["sha256"], "config": cfg.professor.model_dump(mode="json"),
             "cache_fingerprint": m["fingerprint"], "files": pfiles, "bytes": sum(f["bytes"] for f in pfiles),
             "refine_seconds": round(time.time() - t0, 2), "train_seconds": rec["train_seconds"]}
    entry.update(_measure(cache, pfiles, lc))
    manifest = dict(_without_professor(m), professor=entry)
    manifest["columns"][C.REFINED] = f"tensor<halffloat>[{m['dataset']['num_classes']}]"
    write_json(fs, posixpath.join(root, MANIFEST), manifest)  # the commit: the teachers' files are untouched
    rec.update(refined_acc=entry["refined_acc"], ensemble_acc=entry["ensemble_acc"], heldout=entry["heldout"])
    professor_record(out).write(rec)
    h = entry["heldout"]
    log.info(f"[professor] refined targets: {100 * entry['refined_acc']:.2f}% accurate on the cached views "
          f"(teacher ensemble {100 * entry['ensemble_acc']:.2f}%), {entry['bytes'] / 2**20:.2f} MiB")
    if h["rows"]:
        log.info(f"[professor] on {h['rows']} held-out rows: refined {100 * h['refined_acc']:.2f}% vs teachers "
              f"{100 * h['teacher_acc']:.2f}% ({100 * h['fixed']:.1f}% of the teachers' errors fixed, "
              f"{100 * h['broken']:.1f}% of their right answers broken); distance to the teachers "
              f"{h['tv_teachers']:.3f}, to the label mix {h['tv_label_mix']:.3f}; non-target correlation "
              f"{h['nontarget_corr']:.3f}")
    return entry


def _train(cfg, cache, lc, fp, out, device) -> dict:
    from raykd.pipeline.cache.epochs import in_memory_choice, row_bytes
    from raykd.pipeline.harness.driver import StageDriver
    from raykd.pipeline.harness.placement import Placement, queue_of

    p, m = cfg.professor, cache.manifest
    w = p.workers
    views = sorted({e % m["views"] for e in range(p.optim.epochs)})
    targets = cache.target_reader()
    nbytes = row_bytes(m["columns"], ["sample_id", "label", *targets.all_columns]) * m["dataset"]["train_samples"] * len(views)
    log.info(f"[professor] training on the cached targets of {cache.sources}: {p.optim.epochs} epochs, "
          f"{w.num_workers} worker(s)")
    t0 = time.time()
    place = Placement.decide(cfg, w, jobs=1)
    place.device = device
    with place.progress() as progress:
        job = ProfessorJob(kind="professor", name="CAAE", run_name=f"professor-{fp[:12]}", seed=p.seed, imports=job_imports(cfg),
                           tracking=tracking_spec(cfg, "professor", "CAAE", f"professor-{fp[:12]}"),
                           epochs=p.optim.epochs, workers=w, storage=place.storage, device=device,
                           torch_threads=place.threads(), progress=queue_of(progress), lc=lc, targets=targets,
                           views=CacheViews(cache.fs, {k: cache.view_files(k) for k in views},
                                            ("sample_id", "label", *targets.all_columns),
                                            cache.checks([p for k in views for p in cache.view_files(k)]),
                                            in_memory=in_memory_choice(cfg.distill.in_memory, nbytes // w.num_workers)))
        res = StageDriver(place).one(job)
    state, history = res.state, res.history
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    rec = {"file": "professor.safetensors",
           "sha256": save_state_dict(state["task"]["professor"], os.path.join(out, "professor.safetensors")),
           "fingerprint": fp, "epochs": len(history), "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
           "train_seconds": round(time.time() - t0, 2)}
    professor_record(out).write(rec)
    return rec


def _without_professor(m: dict) -> dict:
    return {**{k: v for k, v in m.items() if k != "professor"},
            "columns": {k: v for k, v in m["columns"].items() if k != "refined"}}


def refinement_stats(q: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> dict:
    """What refined targets p did to the teachers' q (both (N, C) probabilities at the professor's tau):
    accuracy of each, the share of the teachers' errors fixed and of their right answers broken, mean
    total-variation distance of p to q and to the label mix (q + e_y) / 2, mean entropies, and the mean
    Pearson correlation of p's and q's non-target probabilities (per sample, over the C - 1 others)."""
    n, c = q.shape
    onehot = F.one_hot(labels, c).to(q.dtype)
    right_q, right_p = q.argmax(1) == labels, p.argmax(1) == labels
    tv = lambda a, b: 0.5 * (a - b).abs().sum(1).mean().item()  # noqa: E731
    ent = lambda a: -(a * a.clamp_min(1e-12).log()).sum(1).mean().item()  # noqa: E731
    mask = ~onehot.bool()
    qo, po = q[mask].view(n, c - 1), p[mask].view(n, c - 1)
    qo, po = qo - qo.mean(1, keepdim=True), po - po.mean(1, keepdim=True)
    corr = (qo * po).sum(1) / (qo.norm(dim=1) * po.norm(dim=1)).clamp_min(1e-12)
    return {"rows": n, "teacher_acc": right_q.float().mean().item(), "refined_acc": right_p.float().mean().item(),
            "fixed": (right_p & ~right_q).sum().item() / max(1, int((~right_q).sum())),
            "broken": (~right_p & right_q).sum().item() / max(1, int(right_q.sum())),
            "tv_teachers": tv(p, q), "tv_label_mix": tv(p, 0.5 * (q + onehot)),
            "entropy_refined": ent(p), "entropy_teachers": ent(q), "nontarget_corr": corr.mean().item()}


def _measure(cache: Cache, pfiles: list[dict], lc: dict) -> dict:
    """Refined targets' and the teacher ensemble's accuracy on the cached views (keyed by sample, view), and
    `refinement_stats` on the samples the professor did not train on (`heldout`)."""
    from raykd.pipeline.cache.inspect import source_probs

    reader = cache.target_reader()
    t = cache.read_table(["sample_id", "view_id", "label", *reader.all_columns])
    sid = column_array(t, "sample_id")
    key = column_array(t, "view_id").astype(np.int64) * (1 << 40) + sid
    order = np.argsort(key)
    labels = column_array(t, "label")[order]
    probs = sum(source_probs(cache, t, s) for s in cache.sources)[order]
    rkey, refined = load_refined(cache.fs, [posixpath.join(cache.root, f["path"]) for f in pfiles], by_view=True)
    if not np.array_equal(rkey, key[order]):
        raise CacheError("professor: the refined rows do not match the cache's (sample_id, view_id) rows")
    out = {"refined_acc": float((refined.argmax(1) == labels).mean()),
           "ensemble_acc": float((probs.argmax(1).numpy() == labels).mean())}
    idx = np.flatnonzero(held_out(sid[order], lc["holdout"], lc["seed"]))  # positions in key order
    if len(idx) == 0:
        return {**out, "heldout": {"rows": 0}}
    raw = {c: column_array(t, c)[order[idx]] for c in reader.all_columns}
    z = reader(raw)
    y = torch.from_numpy(labels[idx].astype(np.int64))
    q = teacher_probs([z[s] for s in lc["teachers"]], y, lc["temperature"], lc["ensemble"])
    p = torch.softmax(torch.from_numpy(refined[idx].astype(np.float32)) / lc["temperature"], 1)
    return {**out, "heldout": {k: round(v, 5) if isinstance(v, float) else v for k, v in
                               refinement_stats(q, p, y).items()}}


def professor_record(out: str) -> StageRecord:
    """The professor's record (professor.json) and its checkpoint."""
    return StageRecord(os.path.join(out, RECORD), ProfessorRecord, "professor record",
                       files=lambda r: {r["file"]: r["sha256"]})
