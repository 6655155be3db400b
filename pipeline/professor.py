"""`raykd professor`: train the CAAE professor on the cached teacher targets, then add a `refined` column.

Training is a job of the shared harness (pipeline.harness) reading only the cache's labels and teacher
logits (no teacher runs), one view partition per epoch. The refined column is then written by a Ray Data actor pool over the cache
into its own files, `refined/view=k/*.parquet` (sample_id, view_id, refined), keyed by
(sample_id, view_id); the teachers' part files are never rewritten. The manifest, rewritten last,
records the professor (checkpoint sha256, config, fingerprint chained on the cache's, its files and
the refined targets' accuracy). Outputs under <out_dir>/professor/: professor.safetensors,
professor.json, metrics.jsonl, config.resolved.yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import time
from typing import Any

import numpy as np
import torch

from methods.professor import Professor, professor_losses
from pipeline.cache import columns as C
from pipeline.cache import (MANIFEST, REFINED, Cache, CacheError, TargetReader, cache_uri, column_array,
                            describe_files, load_refined, view_dir, write_json)
from pipeline.checkpoints import load_into, read_verified, save_state_dict, sha256_file, state_from_bytes
from pipeline.config import Config, write_resolved
from pipeline.harness import Job, Task
from pipeline.progress import Console, ProgressPrinter



def professor_fingerprint(cache_fp: str, cfg: Config) -> str:
    p = cfg.professor.model_dump(mode="json", exclude={"workers", "actors", "cpus_per_actor"})
    return hashlib.sha256(json.dumps({"cache": cache_fp, "professor": p}, sort_keys=True).encode()).hexdigest()


def _build(lc: dict) -> Professor:
    return Professor(lc["num_classes"], lc["latent_dim"], lc["hidden"], lc["temperature"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfessorJob(Job):
    lc: dict  # the professor's sizes, target sources (teachers), loss weights and optimiser
    targets: TargetReader  # the sources' stored columns, and how they become logits
    cache_fs: Any
    files: dict  # view -> its part files
    checks: Any = None  # their sha256, checked as the job reads them
    in_memory: bool = True

    def build(self, ctx):
        return ProfessorTask(self, ctx)

    def datasets(self) -> dict:
        if self.in_memory:
            return {}
        import ray

        return {f"view{k}": ray.data.read_parquet(f, filesystem=self.cache_fs).select_columns(self.columns)
                for k, f in self.files.items()}

    @property
    def columns(self) -> list[str]:
        return ["sample_id", "label", *self.targets.all_columns]


class ProfessorTask(Task):
    """The professor's training: cached teacher logits and labels only, one view partition per epoch."""

    prefix = ""  # its metrics are loss, rec, cls, adv_z, adv_q, refined_acc, d_loss
    optim_key = "professor.optim"

    def __init__(self, job: ProfessorJob, ctx):
        from pipeline.batches import MemoryEpochs, StreamEpochs, check_view, read_view, worker_share
        from pipeline.data import as_tensor

        lc = job.lc
        self.job, self.ctx, self.lc = job, ctx, lc
        self.prof = _build(lc).to(ctx.device)
        self.opt_g = torch.optim.Adam(self.prof.generator_parameters(), lr=lc["lr"])
        self.opt_d = torch.optim.Adam(self.prof.discriminator_parameters(), lr=lc["lr"])
        view_of = lambda e: e % lc["views"]  # noqa: E731
        cols = job.columns

        def prepare(raw):  # the targets as logits (top-k rebuilt), per source
            return {"y": as_tensor(raw["label"]).long(), **{C.logits(s): z for s, z in job.targets(raw).items()}}

        if job.in_memory:
            def load(k):
                raw = read_view(job.cache_fs, job.files[k], cols, job.checks)
                share = worker_share(len(raw["sample_id"]), ctx.rank, ctx.world, job.seed)
                return prepare({c: v[share] for c, v in raw.items()})

            self.data = MemoryEpochs(load, view_of, lc["batch_size"], True, job.seed)
        else:
            import ray

            if ctx.world > 1:
                source = lambda k: ctx.shard(f"view{k}")  # noqa: E731
            else:
                source = lambda k: ray.data.read_parquet(job.files[k], filesystem=job.cache_fs).select_columns(cols)  # noqa: E731
            self.data = StreamEpochs(source, view_of, lc["batch_size"], 4096, job.seed, prepare,
                                     check=check_view(job.cache_fs, job.files, job.checks))

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
                f"adv_q {m['adv_q']:.3f} d {m['d_loss']:.3f}) refined acc {m['refined_acc']:.4f}")


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
    from pipeline.raysetup import init_ray, local_thread_share, resolve_device

    uri = cache_uri(cfg)
    cache = Cache(uri, cfg.cache.s3_endpoint)
    m = cache.manifest
    fp = professor_fingerprint(m["fingerprint"], cfg)
    if (m.get("professor") or {}).get("fingerprint") == fp:
        print(f"[professor] {uri}: refined column up to date (fingerprint {fp[:12]}), reused", flush=True)
        return m["professor"]
    p = cfg.professor
    out = os.path.join(os.path.abspath(cfg.run.out_dir), "professor")
    os.makedirs(out, exist_ok=True)
    write_resolved(cfg, out)
    lc = {"num_classes": m["dataset"]["num_classes"], "latent_dim": p.latent_dim, "hidden": p.hidden,
          "temperature": p.temperature, "teachers": cache.sources, "views": m["views"],
          "batch_size": p.optim.batch_size, "lr": p.optim.lr,
          "weights": {"w_rec": p.w_rec, "w_cls": p.w_cls, "w_z": p.w_z, "w_q": p.w_q}}
    rec = read_record(out)
    init_ray(cfg.ray)  # before ray.data is imported: it reads raykd's logging settings then
    import ray
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    device = resolve_device(cfg.run.device)
    if rec is None or rec.get("fingerprint") != fp or not _intact(out, rec):
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
    ds = ds.map_batches(RefineForward, batch_format="numpy", batch_size=1024,
                        compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus_per_actor, **res,
                        fn_constructor_kwargs={"lc": lc, "targets": targets, "path": os.path.join(out, rec["file"]),
                                               "weights": read_verified(os.path.join(out, rec["file"]), rec["sha256"]),
                                               "threads": local_thread_share(cfg.ray, p.actors)})
    print(f"[professor] writing the refined column of {m['rows']} rows into {pdir}", flush=True)
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
    entry.update(_accuracy(cache, pfiles))
    manifest = dict(_without_professor(m), professor=entry)
    manifest["columns"][C.REFINED] = f"tensor<halffloat>[{m['dataset']['num_classes']}]"
    write_json(fs, posixpath.join(root, MANIFEST), manifest)  # the commit: the teachers' files are untouched
    rec.update(refined_acc=entry["refined_acc"], ensemble_acc=entry["ensemble_acc"])
    _write_record(out, rec)
    print(f"[professor] refined targets: {100 * entry['refined_acc']:.2f}% accurate on the cached views "
          f"(teacher ensemble {100 * entry['ensemble_acc']:.2f}%), {entry['bytes'] / 2**20:.2f} MiB", flush=True)
    return entry


def _train(cfg, cache, lc, fp, out, device) -> dict:
    from pipeline.batches import in_memory_choice, row_bytes
    from pipeline.harness import fit
    from pipeline.raysetup import in_process, local_thread_share, train_storage

    p, m = cfg.professor, cache.manifest
    w = p.workers
    views = sorted({e % m["views"] for e in range(p.optim.epochs)})
    targets = cache.target_reader()
    nbytes = row_bytes(m["columns"], ["sample_id", "label", *targets.all_columns]) * m["dataset"]["train_samples"] * len(views)
    print(f"[professor] training on the cached targets of {cache.sources}: {p.optim.epochs} epochs, "
          f"{w.num_workers} worker(s)", flush=True)
    t0 = time.time()
    inline = in_process(cfg, 1, w)
    with (contextlib.nullcontext(Console()) if inline else ProgressPrinter()) as progress:
        job = ProfessorJob(kind="professor", name="CAAE", run_name=f"professor-{fp[:12]}", seed=p.seed,
                           epochs=p.optim.epochs, workers=w, storage=train_storage(cfg), device=device,
                           torch_threads=w.torch_threads or local_thread_share(cfg.ray, w.num_workers),
                           progress=getattr(progress, "queue", progress), lc=lc, targets=targets, cache_fs=cache.fs,
                           files={k: cache.view_files(k) for k in views},
                           checks=cache.checks([p for k in views for p in cache.view_files(k)]),
                           in_memory=in_memory_choice(cfg.distill.in_memory, nbytes // w.num_workers))
        res = fit(job, inline=inline)
    state, history = res.state, res.history
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    rec = {"file": "professor.safetensors",
           "sha256": save_state_dict(state["task"]["professor"], os.path.join(out, "professor.safetensors")),
           "fingerprint": fp, "epochs": len(history), "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
           "train_seconds": round(time.time() - t0, 2)}
    _write_record(out, rec)
    return rec


def _without_professor(m: dict) -> dict:
    return {**{k: v for k, v in m.items() if k != "professor"},
            "columns": {k: v for k, v in m["columns"].items() if k != "refined"}}


def _accuracy(cache: Cache, pfiles: list[dict]) -> dict:
    """Refined targets' and the teacher ensemble's accuracy on the cached views (keyed by sample, view)."""
    from pipeline.cache.inspect import source_probs

    t = cache.read_table(["sample_id", "view_id", "label", *cache.target_reader().all_columns])
    key = column_array(t, "view_id").astype(np.int64) * (1 << 40) + column_array(t, "sample_id")
    order = np.argsort(key)
    labels = column_array(t, "label")[order]
    probs = sum(source_probs(cache, t, s) for s in cache.sources)[order]
    rkey, refined = load_refined(cache.fs, [posixpath.join(cache.root, f["path"]) for f in pfiles], by_view=True)
    if not np.array_equal(rkey, key[order]):
        raise CacheError("professor: the refined rows do not match the cache's (sample_id, view_id) rows")
    return {"refined_acc": float((refined.argmax(1) == labels).mean()),
            "ensemble_acc": float((probs.argmax(1).numpy() == labels).mean())}


def read_record(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "professor.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_record(out: str, rec: dict) -> None:
    tmp = os.path.join(out, "professor.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(tmp, os.path.join(out, "professor.json"))


def _intact(out: str, rec: dict) -> bool:
    path = os.path.join(out, rec.get("file", ""))
    return os.path.isfile(path) and sha256_file(path) == rec.get("sha256")
