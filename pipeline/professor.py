"""`raykd professor`: train the CAAE professor on the cached teacher targets, then add a `refined` column.

Training is a Ray Train job reading only the cache's labels and teacher logits (no teacher runs), one
view partition per epoch. The refined column is then written by a Ray Data actor pool over the cache
into its own files, `professor/view=k/*.parquet` (sample_id, view_id, refined), keyed by
(sample_id, view_id); the teachers' part files are never rewritten. The manifest, rewritten last,
records the professor (checkpoint sha256, config, fingerprint chained on the cache's, its files and
the refined targets' accuracy). Outputs under <out_dir>/professor/: professor.safetensors,
professor.json, metrics.jsonl, config.resolved.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time

import numpy as np
import torch

from methods.professor import Professor, professor_losses
from pipeline.cache import (MANIFEST, Cache, CacheError, describe_files, write_json, cache_uri, column_array,
                            load_refined)
from pipeline.checkpoints import load_into, read_verified, save_state_dict, sha256_file, state_from_bytes
from pipeline.config import Config, write_resolved
from pipeline.progress import ProgressPrinter, emit
from pipeline.training import checkpoint_state

PROF_DIR = "professor"


def professor_fingerprint(cache_fp: str, cfg: Config) -> str:
    p = cfg.professor.model_dump(mode="json", exclude={"workers", "actors", "cpus_per_actor"})
    return hashlib.sha256(json.dumps({"cache": cache_fp, "professor": p}, sort_keys=True).encode()).hexdigest()


def _build(lc: dict) -> Professor:
    return Professor(lc["num_classes"], lc["latent_dim"], lc["hidden"], lc["temperature"])


def professor_loop(lc: dict) -> list[dict]:
    """The professor's training on a Ray Train worker: cached teacher logits and labels only."""
    import ray.train

    from pipeline.training import report_epoch, restored_state, worker_setup

    rank, world, device = worker_setup(lc["torch_threads"], lc["seed"])
    prof = _build(lc).to(device)
    opt_g = torch.optim.Adam(prof.generator_parameters(), lr=lc["lr"])
    opt_d = torch.optim.Adam(prof.discriminator_parameters(), lr=lc["lr"])
    start, history = 0, []
    state = restored_state()
    if state is not None:
        prof.load_state_dict(state["professor"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start, history = int(state["epoch"]) + 1, json.loads(state["history"])

    def sync(params):  # several workers: average their gradients (the professor is not wrapped in DDP)
        if world > 1:
            import torch.distributed as dist

            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    for epoch in range(start, lc["epochs"]):
        shard = ray.train.get_dataset_shard(f"view{epoch % lc['views']}")
        t0, seen, sums = time.time(), 0, {}
        for batch in shard.iter_torch_batches(batch_size=lc["batch_size"], local_shuffle_buffer_size=4096,
                                              local_shuffle_seed=lc["seed"] * 1000 + epoch):
            y = batch["label"].to(device, dtype=torch.long)
            terms, d_loss = professor_losses(prof, [batch[f"logits.{t}"].to(device) for t in lc["teachers"]], y,
                                             **lc["weights"])
            opt_g.zero_grad(set_to_none=True)
            terms["loss"].backward()
            sync(prof.generator_parameters())
            opt_g.step()
            opt_d.zero_grad(set_to_none=True)  # drops what the generator's loss left on the discriminators
            d_loss.backward()
            sync(prof.discriminator_parameters())
            opt_d.step()
            terms["d_loss"] = d_loss
            seen += len(y)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(y)
        m = {"epoch": epoch + 1, **{k: v / max(1, seen) for k, v in sums.items()}, "epoch_time_s": time.time() - t0}
        history.append(m)
        if rank == 0:
            emit(lc["progress"], f"[professor] epoch {epoch + 1}/{lc['epochs']} loss {m['loss']:.4f} (rec {m['rec']:.4f} "
                 f"cls {m['cls']:.4f} adv_z {m['adv_z']:.3f} adv_q {m['adv_q']:.3f} d {m['d_loss']:.3f}) refined acc "
                 f"{m['refined_acc']:.4f} ({m['epoch_time_s']:.1f}s)")
        report_epoch(m, {"professor": prof.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                         "epoch": epoch, "history": json.dumps(history)} if rank == 0 else None)
    return history


class RefineForward:
    """The actor pool's callable: loads the professor once, adds the refined column (tau * r, fp16)."""

    def __init__(self, lc: dict, path: str, weights: bytes, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.teachers = lc["teachers"]
        self.prof = _build(lc)
        load_into(self.prof, state_from_bytes(weights, path), path, "professor")
        self.prof.eval()

    def __call__(self, batch: dict) -> dict:
        logits = [torch.from_numpy(np.ascontiguousarray(batch[f"logits.{t}"])) for t in self.teachers]
        refined = self.prof.refine(logits, torch.from_numpy(batch["label"].astype(np.int64)))
        return {"sample_id": batch["sample_id"], "view_id": batch["view_id"], "view": batch["view_id"].copy(),
                "refined": refined.half().numpy()}


def run_professor(cfg: Config) -> dict:
    """Train (or reuse) the professor and add (or keep) the cache's refined column; returns the manifest entry."""
    import ray
    import ray.train
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat
    from ray.train.torch import TorchTrainer

    from pipeline.raysetup import TRAIN_LOG_LEVEL, init_ray, local_thread_share, resolve_device

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
          "temperature": p.temperature, "teachers": cache.teachers, "views": m["views"], "seed": p.seed,
          "epochs": p.optim.epochs, "batch_size": p.optim.batch_size, "lr": p.optim.lr,
          "weights": {"w_rec": p.w_rec, "w_cls": p.w_cls, "w_z": p.w_z, "w_q": p.w_q}}
    rec = _read_record(out)
    init_ray(cfg.ray)
    device = resolve_device(cfg.run.device)
    if rec is None or rec.get("fingerprint") != fp or not _intact(out, rec):
        rec = _train(cfg, cache, lc, fp, out, device, TorchTrainer, TRAIN_LOG_LEVEL, local_thread_share)

    # the refine pass: a Ray Data actor pool over every view, into professor/view=k/
    t0 = time.time()
    fs, root = cache.fs, cache.root
    pdir = posixpath.join(root, PROF_DIR)
    if m.get("professor"):  # uncommit the professor this one replaces before deleting its files
        write_json(fs, posixpath.join(root, MANIFEST), _without_professor(m))
    if fs.exists(pdir):
        fs.rm(pdir, recursive=True)
    ray.data.DataContext.get_current().arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE
    files = [f for k in range(m["views"]) for f in cache.view_files(k)]
    cols = ["sample_id", "view_id", "label", *[f"logits.{t}" for t in cache.teachers]]
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    res = {"num_gpus": 1} if device == "cuda" else {}
    ds = ds.map_batches(RefineForward, batch_format="numpy", batch_size=1024,
                        compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus_per_actor, **res,
                        fn_constructor_kwargs={"lc": lc, "path": os.path.join(out, rec["file"]),
                                               "weights": read_verified(os.path.join(out, rec["file"]), rec["sha256"]),
                                               "threads": local_thread_share(cfg.ray, p.actors)})
    print(f"[professor] writing the refined column of {m['rows']} rows into {pdir}", flush=True)
    ds.write_parquet(pdir, filesystem=fs, partition_cols=["view"], min_rows_per_file=cfg.cache.rows_per_file,
                     compression="zstd")
    fs.invalidate_cache()
    pfiles = []
    for k in range(m["views"]):
        vf = describe_files(fs, root, posixpath.join(pdir, f"view={k}"))
        if sum(f["rows"] for f in vf) != m["dataset"]["train_samples"]:
            raise CacheError(f"professor: view {k} got {sum(f['rows'] for f in vf)} refined rows, expected "
                             f"{m['dataset']['train_samples']}; not committed")
        pfiles += vf
    entry = {"fingerprint": fp, "checkpoint_sha256": rec["sha256"], "config": cfg.professor.model_dump(mode="json"),
             "cache_fingerprint": m["fingerprint"], "files": pfiles, "bytes": sum(f["bytes"] for f in pfiles),
             "refine_seconds": round(time.time() - t0, 2), "train_seconds": rec["train_seconds"]}
    entry.update(_accuracy(cache, pfiles))
    manifest = dict(_without_professor(m), professor=entry)
    manifest["columns"]["refined"] = f"tensor<halffloat>[{m['dataset']['num_classes']}]"
    write_json(fs, posixpath.join(root, MANIFEST), manifest)  # the commit: the teachers' files are untouched
    rec.update(refined_acc=entry["refined_acc"], ensemble_acc=entry["ensemble_acc"])
    _write_record(out, rec)
    print(f"[professor] refined targets: {100 * entry['refined_acc']:.2f}% accurate on the cached views "
          f"(teacher ensemble {100 * entry['ensemble_acc']:.2f}%), {entry['bytes'] / 2**20:.2f} MiB", flush=True)
    return entry


def _train(cfg, cache, lc, fp, out, device, TorchTrainer, log_level, thread_share) -> dict:
    import ray.train

    from pipeline.raysetup import scaling, train_storage

    p, m = cfg.professor, cache.manifest
    w = p.workers
    views = sorted({e % m["views"] for e in range(p.optim.epochs)})
    datasets = {f"view{k}": cache.view_dataset(k, ["label", *[f"logits.{t}" for t in cache.teachers]]) for k in views}
    use_gpu = device == "cuda"
    print(f"[professor] training on the cached targets of {cache.teachers}: {p.optim.epochs} epochs, "
          f"{w.num_workers} worker(s)", flush=True)
    t0 = time.time()
    with ProgressPrinter() as progress:
        trainer = TorchTrainer(
            professor_loop,
            train_loop_config={**lc, "progress": progress.queue,
                               "torch_threads": w.torch_threads or thread_share(cfg.ray, w.num_workers)},
            scaling_config=scaling(w, use_gpu),
            run_config=ray.train.RunConfig(
                name=f"professor-{fp[:12]}", **train_storage(cfg),
                logging_config=ray.train.LoggingConfig(log_level=log_level),
                failure_config=ray.train.FailureConfig(max_failures=w.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
            datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)))
        result = trainer.fit()
    state = checkpoint_state(result.checkpoint)
    history = json.loads(state["history"])
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    rec = {"file": "professor.safetensors", "sha256": save_state_dict(state["professor"], os.path.join(out, "professor.safetensors")),
           "fingerprint": fp, "epochs": len(history), "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
           "train_seconds": round(time.time() - t0, 2)}
    _write_record(out, rec)
    return rec


def _without_professor(m: dict) -> dict:
    return {**{k: v for k, v in m.items() if k != "professor"},
            "columns": {k: v for k, v in m["columns"].items() if k != "refined"}}


def _accuracy(cache: Cache, pfiles: list[dict]) -> dict:
    """Refined targets' and the teacher ensemble's accuracy on the cached views (keyed by sample, view)."""
    t = cache.read_table(["sample_id", "view_id", "label", *[f"logits.{n}" for n in cache.teachers]])
    key = column_array(t, "view_id").astype(np.int64) * (1 << 40) + column_array(t, "sample_id")
    order = np.argsort(key)
    labels = column_array(t, "label")[order]
    probs = sum(torch.from_numpy(column_array(t, f"logits.{n}")[order].astype(np.float32)).softmax(1)
                for n in cache.teachers)
    rkey, refined = load_refined(cache.fs, [posixpath.join(cache.root, f["path"]) for f in pfiles], by_view=True)
    if not np.array_equal(rkey, key[order]):
        raise CacheError("professor: the refined rows do not match the cache's (sample_id, view_id) rows")
    return {"refined_acc": float((refined.argmax(1) == labels).mean()),
            "ensemble_acc": float((probs.argmax(1).numpy() == labels).mean())}


def _read_record(out: str) -> dict | None:
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
