"""`raykd distill`: train one student on Ray Train, from the teacher cache or with the teachers online.

Cached mode: each view partition of the cache is a Ray Dataset; epoch e reads partition e mod K
(`get_dataset_shard` -> `iter_torch_batches`, local shuffle), so the student sees exactly the views
the teachers saw. Online mode runs the same loop on the same views, rendered from the source images,
with the teachers inside each worker: the speed baseline and the check that the cache changes nothing.

Output under <out_dir>/students/<name>/: student.safetensors and student.pt (state dict), method.safetensors
(the method's own trained modules, if any), metrics.jsonl / metrics.csv (every loss term, accuracies,
samples/s per epoch), student.json (summary + fingerprint) and config.resolved.yaml.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

from methods import METHODS, MethodContext, Targets, build_method
from pipeline.checkpoints import read_verified, save_state_dict, sha256_file
from pipeline.config import Config, MethodSection, OptimSection, write_resolved
from pipeline.data import normalize
from pipeline.errors import CheckpointError, RaykdError, StageFailed
from pipeline.models import build_model
from pipeline.progress import ProgressPrinter, emit
from pipeline.training import (checkpoint_state, collect, evaluate, failure_reason, make_optimizer, optimizer_step,
                               report_epoch, restored_state, split_to_ray, worker_setup)
from pipeline.views import ViewPolicy, apply_views, make_views

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
    return f"{method}-{cfg.distill.student.arch}-s{student_seed(cfg)}{online}"


def student_dir(cfg: Config) -> str:
    return os.path.join(os.path.abspath(cfg.run.out_dir), "students", student_name(cfg))


class Distiller(nn.Module):
    """Student + method as one module, so one DDP wrapper syncs the student and the method's own parts."""

    def __init__(self, student: nn.Module, method: nn.Module):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x, targets: Targets, labels, epoch: int):
        logits, stages = self.student.forward_stages(x)
        return logits, self.method(logits, stages, targets, labels, epoch)


# --------------------------------------------------------------------------------------------------
# the Ray Train worker loop


def _maybe_fail(fault: dict | None, rank: int, epoch: int, step: int) -> None:
    """Fault injection for the tests (RAYKD_FAULT): fail once, at (epoch, step), on rank 0."""
    if not fault or rank != 0 or (epoch, step) != (fault["epoch"], fault["step"]) or os.path.exists(fault["marker"]):
        return
    open(fault["marker"], "w").close()
    if fault.get("kind") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected fault at epoch {epoch} step {step}")


def _batch_views(batch: dict, lc: dict, epoch: int, train_images, device):
    """The batch's views as normalised float tensors: the cached pixels, else rendered here by the same
    pure function of (seed, sample id, view id) the cache used."""
    if "pixels" in batch:
        pixels = batch["pixels"]
    elif "image" in batch:  # online: source rows, view e mod K
        pixels = torch.from_numpy(make_views(batch["image"].numpy(), batch["sample_id"].numpy(), epoch % lc["views"],
                                             lc["data_seed"], ViewPolicy(**lc["policy"]))[0])
    else:  # a cache without pixels: replay its view records on the source images
        images = train_images[np.searchsorted(lc["train_ids"], batch["sample_id"].numpy())]
        pixels = torch.from_numpy(apply_views(images, batch["view_ox"].numpy(), batch["view_oy"].numpy(),
                                              batch["view_flip"].numpy(), lc["policy"]["pad"]))
    return normalize(pixels.to(device, non_blocking=True), lc["mean"], lc["std"])


def _column_teacher(col: str) -> str | None:
    """The teacher a cache column belongs to (logits.<t>, feat.<t>.<stage>), else None."""
    parts = col.split(".")
    return parts[1] if parts[0] in ("logits", "feat", "topk") and len(parts) > 1 else None


def _feature(batch: dict, col: str, device) -> torch.Tensor:
    """A cached feature map as float32: fp16 as stored, int8 dequantised with its per-row `.scale`."""
    x = batch[col].to(device)
    if col + ".scale" in batch:
        from pipeline.cache import dequantize_int8

        return dequantize_int8(x, batch[col + ".scale"].to(device))
    return x.float()


def _load_online_teachers(lc: dict, device) -> dict[str, nn.Module]:
    from pipeline.checkpoints import load_into, state_from_bytes

    models = {}
    for t in lc["online_teachers"]:
        m = build_model(t["arch"], lc["num_classes"], lc["in_chans"])
        load_into(m, state_from_bytes(t["weights"], t["path"]), t["path"], t["arch"])
        models[t["name"]] = m.to(device).eval()
    return models


def _lookup(refined: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> torch.Tensor:
    keys, values = refined
    pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    if not np.array_equal(keys[pos], ids):
        raise RuntimeError("the cache's refined column lacks some of this view's sample ids: it does not match the cache")
    return torch.from_numpy(values[pos])


def _load_online_professor(lc: dict, device):
    from methods.professor import Professor
    from pipeline.checkpoints import load_into, state_from_bytes

    p = lc["online_professor"]
    prof = Professor(lc["num_classes"], p["latent_dim"], p["hidden"], p["temperature"])
    load_into(prof, state_from_bytes(p["weights"], p["path"]), p["path"], "professor")
    return prof.to(device).eval()


def distill_loop(lc: dict) -> list[dict]:
    """One student's distillation on a Ray Train worker. `lc` is a plain dict (it crosses processes)."""
    import ray
    import ray.train
    import ray.train.torch

    rank, world, device = worker_setup(lc["torch_threads"], lc["seed"])
    student = build_model(lc["arch"], lc["num_classes"], lc["in_chans"])
    method = build_method(MethodSection(**lc["method"]), MethodContext(**lc["method_ctx"]))
    teachers = _load_online_teachers(lc, device) if lc["online_teachers"] else {}
    train_images = ray.get(lc["train_images"]) if lc["train_images"] is not None else None
    val_x, val_y = collect(ray.train.get_dataset_shard("val"))
    test_x, test_y = collect(ray.train.get_dataset_shard("test"))

    epochs, bs = lc["epochs"], lc["batch_size"]
    steps = max(1, -(-lc["n_train"] // (world * bs)))
    opt, sched = make_optimizer([*student.parameters(), *method.parameters()], OptimSection(**lc["optim"]), steps, epochs)
    start, history, resumed = 0, [], None
    state = restored_state()
    if state is not None:  # a restarted worker group, or a rerun of an interrupted run (same run name)
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]) + 1, json.loads(state["history"])
        resumed = start
        if rank == 0:
            emit(lc["progress"], f"[distill {lc['name']}] resuming after epoch {start} from its checkpoint")
    model = ray.train.torch.prepare_model(Distiller(student, method))
    bare = model.module if hasattr(model, "module") else model

    professor = _load_online_professor(lc, device) if lc["online_professor"] else None
    layers = method.feature_layers()
    for epoch in range(start, epochs):
        shard = ray.train.get_dataset_shard(f"view{epoch % lc['views']}" if lc["cached"] else "train")
        refined = None
        if lc["refined"]:  # the professor's column of this view, looked up by sample id
            from pipeline.cache import load_refined

            refined = load_refined(lc["refined"]["fs"], lc["refined"]["files"][epoch % lc["views"]])
        t0, seen, correct, sums = time.time(), 0, 0, {}
        model.train()
        for step, batch in enumerate(shard.iter_torch_batches(
                batch_size=bs, device="cpu", local_shuffle_buffer_size=lc["shuffle_buffer"] or None,
                local_shuffle_seed=lc["seed"] * 1000 + epoch)):
            _maybe_fail(lc["fault"], rank, epoch + 1, step)
            x = _batch_views(batch, lc, epoch, train_images, device)
            y = batch["label"].to(device, dtype=torch.long)
            if teachers:
                targets = Targets()
                with torch.no_grad():
                    for n, t in teachers.items():
                        targets.logits[n], maps = t.forward_stages(x)
                        targets.features[n] = {s: maps[s] for s in layers.get(n, [])}
                if professor is not None:
                    targets.refined = professor.refine(list(targets.logits.values()), y)
            else:
                targets = Targets(logits={n: batch[f"logits.{n}"].to(device).float() for n in lc["method_ctx"]["teachers"]
                                          if f"logits.{n}" in batch},
                                  features={n: {s: _feature(batch, f"feat.{n}.{s}", device) for s in ss}
                                            for n, ss in layers.items()})
            if refined is not None:
                targets.refined = _lookup(refined, batch["sample_id"].numpy()).to(device)
            logits, terms = model(x, targets, y, epoch + 1)
            if not torch.isfinite(terms["loss"]):  # stop: every later step would train on nan
                raise FloatingPointError(
                    f"distill {lc['name']}: the loss became {terms['loss'].item()} at epoch {epoch + 1}, step {step + 1} "
                    f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items() if k != 'loss')}); the checkpoints "
                    "of the epochs before are kept; lower distill.optim.lr or set distill.optim.grad_clip")
            optimizer_step(opt, sched, terms["loss"], model.parameters(), lc["optim"].get("grad_clip"))
            n = len(y)
            seen += n
            correct += (logits.argmax(1) == y).sum().item()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * n
        dt = time.time() - t0
        names = sorted(sums)
        totals = torch.tensor([seen, correct, *[sums[k] for k in names]], dtype=torch.float64)
        if world > 1:  # every worker's share: metrics of the whole epoch, not of rank 0's shard
            import torch.distributed as dist

            dist.all_reduce(totals)
        seen_all, correct_all = int(totals[0]), float(totals[1])
        val_acc, val_loss = evaluate(bare.student, val_x, val_y, lc["mean"], lc["std"], device)
        test_acc, _ = evaluate(bare.student, test_x, test_y, lc["mean"], lc["std"], device)
        m = {"epoch": epoch + 1, "view": epoch % lc["views"],
             **{f"train_{k}": float(totals[2 + i]) / max(1, seen_all) for i, k in enumerate(names)},
             "train_acc": correct_all / max(1, seen_all), "val_loss": val_loss, "val_acc": val_acc,
             "test_acc": test_acc, "lr": sched.get_last_lr()[0], "epoch_time_s": dt,
             "samples_per_s": seen_all / max(dt, 1e-9), "samples": seen_all, "workers": world,
             "teachers_loaded": len(teachers) + (professor is not None),  # 0 when the cache serves
             "resumed_after": resumed}  # the epoch this attempt restarted after (None: from scratch)
        history.append(m)
        if rank == 0:
            parts = " ".join(f"{k} {m['train_' + k]:.3f}" for k in names if k != "loss")
            emit(lc["progress"], f"[distill {lc['name']}] epoch {epoch + 1}/{epochs} view {m['view']} "
                 f"loss {m['train_loss']:.3f} ({parts}) train {m['train_acc']:.4f} val {val_acc:.4f} "
                 f"test {test_acc:.4f} ({dt:.1f}s, {m['samples_per_s']:.0f} samples/s)")
        report_epoch(m, {"student": bare.student.state_dict(), "method": bare.method.state_dict(),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                         "history": json.dumps(history)} if rank == 0 else None)
    return history


# --------------------------------------------------------------------------------------------------
# driver


def _teacher_sources(cfg: Config, splits, method_cls, online: bool):
    """(teacher names, their val accuracy, K, upstream fingerprint, cache or None, online teacher entries)."""
    from pipeline.cache import Cache, cache_uri
    from pipeline.teachers import read_record, teacher_dir

    out = os.path.abspath(cfg.run.out_dir)
    if cfg.method.name == "feed" and cfg.method.feed.from_student:
        return _student_as_teacher(cfg, splits, online, out)
    if not online:
        cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint)
        cache.expect(data_fingerprint=splits.fingerprint)
        names = (cfg.method.teachers or cache.teachers) if method_cls.uses_teachers else []
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
        entries.append({"name": n, "arch": rec["arch"], "path": path, "sha256": rec["best"]["sha256"]})
        acc[n] = rec["val_acc"]
    upstream = hashlib.sha256(json.dumps(
        {"teachers": [[e["name"], e["sha256"]] for e in entries], "views": cfg.cache.views,
         "policy": splits.policy.as_dict(), "data": splits.fingerprint}, sort_keys=True).encode()).hexdigest()
    return names, acc, cfg.cache.views, upstream, None, entries


def _student_as_teacher(cfg: Config, splits, online: bool, out: str):
    """`method.feed.from_student`: a finished student is the only teacher, run in the workers (it is
    small) on the cached views (or on views rendered there when online)."""
    from pipeline.cache import Cache, cache_uri

    name = cfg.method.feed.from_student
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
        cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint)
        cache.expect(data_fingerprint=splits.fingerprint)
    views = cache.manifest["views"] if cache is not None else cfg.cache.views
    upstream = hashlib.sha256(f"{rec['fingerprint']}:{entry['sha256']}".encode()).hexdigest()
    return [name], {name: rec["val_acc"]}, views, upstream, cache, [entry]


def _feed_generations(cfg: Config, progress, concurrent: int, tune: bool) -> dict:
    """Sequential FEED: generation 1 distils from the configured teachers; generation g > 1 from the
    frozen student of generation g - 1. Every generation is an ordinary student, `<name>-g<g>`; the
    returned record is the last one's, with every generation's accuracy under `generations`."""
    from pipeline.config import variant

    base, gens = student_name(cfg), cfg.method.feed.generations
    recs: list[dict] = []
    for g in range(1, gens + 1):
        changes = {"method.feed.generations": 1, "distill.name": f"{base}-g{g}"}
        if recs:
            changes.update({"method.feed.from_student": recs[-1]["name"], "method.teachers": None})
        recs.append(run_distill(variant(cfg, changes, f"FEED generation {g}"), progress, concurrent, tune))
    summary = [{"generation": g, "name": r["name"], "teachers": r["teachers"], "val_acc": r["val_acc"],
                "test_acc": r["test_acc"]} for g, r in enumerate(recs, 1)]
    _write_json(os.path.join(student_dir(variant(cfg, {"distill.name": recs[-1]["name"]}, "FEED")), "generations.json"),
                {"generations": summary})
    _say(progress, f"[distill] {base}: sequential FEED, " + ", ".join(
        f"g{s['generation']} val {s['val_acc']:.4f} test {s['test_acc']:.4f}" for s in summary))
    return {**recs[-1], "generations": summary}


def _professor_entry(cfg: Config) -> dict:
    """The trained professor (for online mode with refined targets), verified against its sha256."""
    from pipeline.professor import _read_record

    out = os.path.join(os.path.abspath(cfg.run.out_dir), "professor")
    rec = _read_record(out)
    if rec is None:
        raise RaykdError(f"method.targets={cfg.method.targets} needs the professor: none under {out}; run `raykd professor`")
    path = os.path.join(out, rec["file"])
    if not os.path.isfile(path) or sha256_file(path) != rec["sha256"]:
        raise CheckpointError(f"professor checkpoint {path} is missing or does not match its recorded sha256")
    p = cfg.professor
    return {"path": path, "sha256": rec["sha256"], "latent_dim": p.latent_dim, "hidden": p.hidden,
            "temperature": p.temperature}


def distill_fingerprint(cfg: Config, data_fp: str, upstream: str) -> str:
    d = cfg.distill
    payload = {"data": data_fp, "upstream": upstream, "mode": d.teachers, "student": d.student.arch,
               "seed": student_seed(cfg), "optim": d.optim.model_dump(mode="json"),
               "shuffle": d.shuffle_buffer, "workers": d.workers.num_workers,
               "method": cfg.method.model_dump(mode="json")}
    version = METHODS.get(cfg.method.name).version
    if version > 1:
        payload["method_version"] = version
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _tune_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def _say(queue, line: str) -> None:
    """A console line: printed here, or sent to the driver when this runs in a Ray task (`raykd run`)."""
    if queue is None:
        print(line, flush=True)
    else:
        emit(queue, line)


def run_distill(cfg: Config, progress=None, concurrent: int = 1, tune: bool = False) -> dict:
    """Distil one student as configured; returns its record (also written as student.json).

    `progress`: the driver's progress queue when this runs inside a Ray task or Tune trial next to
    `concurrent - 1` others (`raykd run`, `raykd sweep`), whose workers share the node's cores.
    `tune`: this is a Tune trial: rank 0's epoch metrics are forwarded to Tune."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data import load_splits
    from pipeline.raysetup import TRAIN_LOG_LEVEL, init_ray, local_thread_share, resolve_device, scaling, train_storage

    if cfg.method.name == "feed" and cfg.method.feed.generations > 1:
        return _feed_generations(cfg, progress, concurrent, tune)
    splits = load_splits(cfg.data)
    d = cfg.distill
    online = d.teachers == "online"
    method_cls = METHODS.get(cfg.method.name)
    names, val_acc, views, upstream, cache, online_teachers = _teacher_sources(cfg, splits, method_cls, online)
    name, sdir = student_name(cfg), student_dir(cfg)
    seed = student_seed(cfg)
    student = build_model(d.student.arch, splits.num_classes, splits.in_chans)
    archs = {t["name"]: t["arch"] for t in (cache.manifest["teachers"] if cache is not None else [])}
    archs.update({t["name"]: t["arch"] for t in online_teachers})  # online, or a student as teacher
    mctx = {"num_classes": splits.num_classes, "teachers": names, "teacher_val_acc": val_acc, "epochs": d.optim.epochs,
            "student_stages": {k: list(v) for k, v in student.stage_shapes(splits.image_size).items()},
            "teacher_stages": {n: {k: list(v) for k, v in build_model(archs[n], splits.num_classes, splits.in_chans)
                                   .stage_shapes(splits.image_size).items()} for n in names}}
    method = build_method(cfg.method, MethodContext(**mctx))
    online_professor = None
    if "refined" in method.columns():  # the professor is upstream too
        if cache is not None:
            cache.expect(columns=["refined"])
            prof_fp = cache.manifest["professor"]["fingerprint"]
        else:
            online_professor = _professor_entry(cfg)
            prof_fp = online_professor["sha256"]
        upstream = hashlib.sha256(f"{upstream}:{prof_fp}".encode()).hexdigest()
    fp = distill_fingerprint(cfg, splits.fingerprint, upstream)
    prev = read_student(sdir)
    if prev is not None and prev.get("fingerprint") == fp and _outputs_intact(sdir, prev):
        _say(progress, f"[distill] {name}: up to date ({sdir}), not retrained")
        return prev

    init_ray(cfg.ray)
    device = resolve_device(cfg.run.device)
    datasets = {"val": split_to_ray(splits.val), "test": split_to_ray(splits.test)}
    train_images = None
    refined = None
    if cache is not None:
        in_worker = {t["name"] for t in online_teachers}  # their outputs are computed, not read
        cols = ["sample_id", "label", *[c for c in method.columns() if _column_teacher(c) not in in_worker]]
        cols += ["pixels"] if cache.manifest["store_views"] else ["view_ox", "view_oy", "view_flip"]
        cache.expect(columns=cols)
        cols += [c + ".scale" for c in cols if c.startswith("feat.") and c + ".scale" in cache.manifest["columns"]]
        split_names = [f"view{k}" for k in sorted({e % views for e in range(d.optim.epochs)})]
        for s in split_names:
            datasets[s] = cache.view_dataset(int(s[4:]), columns=[c for c in cols if c != "refined"])
        if "refined" in cols:  # its own files, keyed by sample id: each worker loads one view's per epoch
            refined = {"fs": cache.fs, "files": {int(s[4:]): cache.refined_files(int(s[4:])) for s in split_names}}
        if not cache.manifest["store_views"]:
            train_images = ray.put(splits.train.images)
    else:
        split_names = ["train"]
        datasets["train"] = split_to_ray(splits.train)
    fault = json.loads(os.environ["RAYKD_FAULT"]) if os.environ.get("RAYKD_FAULT") else None
    w = d.workers
    threads = w.torch_threads or local_thread_share(cfg.ray, w.num_workers * concurrent)
    use_gpu = device == "cuda"
    os.makedirs(sdir, exist_ok=True)
    write_resolved(cfg, sdir)
    _say(progress, f"[distill] {name}: {cfg.method.name} -> {d.student.arch} ({student.num_params():,} params), "
         f"{'teachers online' if online else 'from the cache'}{' ' + str(names) if names else ''}, "
         f"{d.optim.epochs} epochs over K={views} views, {w.num_workers} worker(s)")
    t0 = time.time()
    with ProgressPrinter() if progress is None else contextlib.nullcontext() as printer:
        queue = printer.queue if progress is None else progress
        lc = {
            "name": name, "arch": d.student.arch, "seed": seed, "num_classes": splits.num_classes,
            "in_chans": splits.in_chans, "mean": splits.mean, "std": splits.std, "policy": splits.policy.as_dict(),
            "data_seed": cfg.data.seed, "views": views, "cached": cache is not None, "n_train": len(splits.train),
            "train_ids": splits.train.ids, "train_images": train_images,
            # weights travel with the job (Ray's object store), not as paths: no node needs this one's disk
            "online_teachers": [{**t, "weights": read_verified(t["path"], t["sha256"])} for t in online_teachers],
            "method": cfg.method.model_dump(mode="json"), "method_ctx": mctx, "epochs": d.optim.epochs,
            "batch_size": d.optim.batch_size, "optim": d.optim.model_dump(), "shuffle_buffer": d.shuffle_buffer,
            "torch_threads": threads, "progress": queue, "fault": fault, "refined": refined,
            "online_professor": online_professor and {
                **online_professor, "weights": read_verified(online_professor["path"], online_professor["sha256"])},
        }
        trainer = TorchTrainer(
            distill_loop,
            train_loop_config=lc,
            scaling_config=scaling(w, use_gpu),
            run_config=ray.train.RunConfig(
                name=f"student-{name}-{fp[:12]}",  # same name on a rerun = resume from the last checkpoint
                **train_storage(cfg),
                logging_config=ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL),
                failure_config=ray.train.FailureConfig(max_failures=w.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=[_tune_callback()] if tune else None,
            ),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=split_names),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise StageFailed(f"distillation of {name} failed ({failure_reason(e)}); its checkpoints "
                              "are kept: rerun the same command to resume. Ray's logs: /tmp/ray/session_latest/logs") from None
    state = checkpoint_state(result.checkpoint)
    history = json.loads(state["history"])
    rec = _save_outputs(sdir, state, history, cfg, student, names, online or bool(online_teachers), fp, upstream)
    if cfg.method.name == "imf":
        rec["inference"] = _export_imf(sdir, state, student, method, splits, rec["files"])
    rec["wall_time_s"] = round(time.time() - t0, 2)
    _write_json(os.path.join(sdir, RECORD), rec)
    last = history[-1]
    _say(progress, f"[distill] {name}: done, val {last['val_acc']:.4f} test {last['test_acc']:.4f} -> {sdir}")
    return rec


def _export_imf(sdir: str, state: dict, student: nn.Module, method: nn.Module, splits, files: dict) -> dict:
    """IMF's deployed model (student stages up to the deepest IFD + IFDs + heads + attention) saved as
    inference.safetensors, with its parameters, FLOPs and test accuracy next to the full student's."""
    from methods.imf import IMFInference, flops

    student.load_state_dict(state["student"])
    method.load_state_dict(state["method"])
    inf = IMFInference(student, method).eval()
    files["inference.safetensors"] = save_state_dict(inf.state_dict(), os.path.join(sdir, "inference.safetensors"))
    x = torch.zeros(1, splits.in_chans, splits.image_size, splits.image_size)
    test = (torch.from_numpy(splits.test.images), torch.from_numpy(splits.test.labels))
    with torch.no_grad():
        acc, _ = evaluate(inf, *test, splits.mean, splits.std, "cpu")
        student_acc, _ = evaluate(student, *test, splits.mean, splits.std, "cpu")
    return {"stages": list(inf.stages), "ifd_layers": inf.student_layers, "params": inf.num_params(),
            "flops": flops(inf, x), "test_acc": acc, "student_params": student.num_params(),
            "student_flops": flops(student, x), "student_test_acc": student_acc}


def _save_outputs(sdir, state, history, cfg, student, teachers, online, fp, upstream) -> dict:
    files = {"student.safetensors": save_state_dict(state["student"], os.path.join(sdir, "student.safetensors"))}
    pt = os.path.join(sdir, "student.pt")
    torch.save(state["student"], pt + ".tmp")
    os.replace(pt + ".tmp", pt)
    files["student.pt"] = sha256_file(pt)
    if state["method"]:
        files["method.safetensors"] = save_state_dict(state["method"], os.path.join(sdir, "method.safetensors"))
    with open(os.path.join(sdir, "metrics.jsonl"), "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")
    keys = list(dict.fromkeys(k for m in history for k in m))
    with open(os.path.join(sdir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    last = history[-1]
    times = [m["epoch_time_s"] for m in history]
    return {
        "name": student_name(cfg), "method": cfg.method.name, "arch": cfg.distill.student.arch,
        "params": student.num_params(), "seed": student_seed(cfg), "teachers": teachers,
        "mode": "online" if online else "cache", "epochs": len(history), "val_acc": last["val_acc"],
        "test_acc": last["test_acc"], "best_val_acc": max(m["val_acc"] for m in history),
        "epoch_time_s": round(float(np.median(times)), 3), "files": files, "fingerprint": fp, "upstream": upstream,
    }


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_student(sdir: str) -> dict | None:
    try:
        with open(os.path.join(sdir, RECORD)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


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
        if "inference" in r:  # IMF's deployed model beside the full student
            i = r["inference"]
            notes.append(f"{r['name']}: IMF inference model ({' + '.join(i['stages'])} + IFDs on "
                         f"{', '.join(i['ifd_layers'])}) {i['params']:,} params, {i['flops']:,} FLOPs, test "
                         f"{100 * i['test_acc']:.2f}%; full student {i['student_params']:,} params, "
                         f"{i['student_flops']:,} FLOPs, test {100 * i['student_test_acc']:.2f}%")
        for g in r.get("generations", []):  # sequential FEED
            notes.append(f"{r['name']}: generation {g['generation']} ({g['name']}, from {', '.join(g['teachers'])}) "
                         f"val {100 * g['val_acc']:.2f}% test {100 * g['test_acc']:.2f}%")
    return "\n".join(rows + ([""] + notes if notes else []))


def run_students(cfgs: list[Config], parallel: int | None = None) -> list[dict]:
    """Several students (`raykd run`), `parallel` at a time, each `run_distill` in a Ray task pinned to this
    node (it writes the student's files here), so their Ray Train start-up costs overlap. A failed student
    does not stop the others; the failures are reported together at the end (exit 1)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.raysetup import init_ray, jobs_that_fit

    init_ray(cfgs[0].ray)
    if parallel is None:  # as many as fit, one CPU left for Ray Data's reads
        per = max(c.distill.workers.num_workers * c.distill.workers.cpus_per_worker for c in cfgs)
        parallel = jobs_that_fit(per)
    parallel = min(parallel, len(cfgs))
    if parallel == 1:
        return [run_distill(c) for c in cfgs]
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_distill)
    records: list[dict | None] = [None] * len(cfgs)
    failed, pending, todo = [], {}, list(enumerate(cfgs))
    print(f"[distill] {len(cfgs)} students, {parallel} at a time", flush=True)
    with ProgressPrinter() as progress:
        while todo or pending:
            while todo and len(pending) < parallel:
                i, c = todo.pop(0)
                pending[task.remote(c, progress.queue, parallel)] = i
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                records[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, RaykdError) else e
                msg = str(cause).strip().splitlines()[-1] if not isinstance(cause, RaykdError) else str(cause)
                failed.append(f"{student_name(cfgs[i])}: {msg}")
                progress.queue.put(f"[distill] {student_name(cfgs[i])}: FAILED: {msg}")
    if failed:
        raise StageFailed("some students failed (the others are saved):\n  " + "\n  ".join(failed))
    return records
