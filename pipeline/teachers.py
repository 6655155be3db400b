"""`raykd teachers`: train each teacher with a Ray Train TorchTrainer, or load and evaluate a given checkpoint.

Output per teacher under <out_dir>/teachers/<name>/: best.safetensors (by val accuracy),
last.safetensors, metrics.jsonl and teacher.json (arch, sha256 of both files, val/test accuracy,
the accuracy gate, fingerprint). A teacher whose record matches its fingerprint is not retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from pipeline.checkpoints import load_into, load_state_dict, save_state_dict, sha256_file
from pipeline.config import Config, OptimSection, TeacherSpec, write_resolved
from pipeline.data import Splits, load_splits
from pipeline.errors import CheckpointError, ConfigError, RaykdError, StageFailed
from pipeline.models import build_model
from pipeline.progress import ProgressPrinter, emit
from pipeline.training import (checkpoint_state, collect, evaluate, make_optimizer, optimizer_step, report_epoch,
                               restored_state, split_to_ray, view_batch, worker_setup)
from pipeline.views import ViewPolicy

RECORD = "teacher.json"


def teacher_dir(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "teachers", name)


def teacher_fingerprint(spec: TeacherSpec, cfg: Config, data_fp: str) -> str:
    ckpt_sha = sha256_file(spec.checkpoint) if spec.checkpoint and os.path.isfile(spec.checkpoint) else None
    payload = {
        "data": data_fp,
        "spec": spec.model_dump(mode="json"),
        "checkpoint_sha256": ckpt_sha,
        "optim": None if spec.checkpoint else cfg.teachers.optim.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# the Ray Train worker loop


def train_loop(lc: dict) -> list[dict]:
    """One teacher's training on a Ray Train worker. `lc` is a plain dict (it crosses process boundaries)."""
    import ray.train
    import ray.train.torch

    rank, world, device = worker_setup(lc["torch_threads"], lc["seed"])
    model = build_model(lc["arch"], lc["num_classes"], lc["in_chans"])
    policy = ViewPolicy(**lc["policy"])

    train_it = ray.train.get_dataset_shard("train")
    val_x, val_y = collect(ray.train.get_dataset_shard("val"))
    test_x, test_y = collect(ray.train.get_dataset_shard("test"))
    steps = max(1, -(-lc["n_train"] // (world * lc["batch_size"])))

    opt, sched = make_optimizer(model.parameters(), OptimSection(**lc["optim"]), steps, lc["epochs"], lc["lr"])
    start, history = 0, []
    state = restored_state()
    if state is not None:  # a restarted worker group, or a rerun of an interrupted run (same name)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]) + 1, json.loads(state["history"])
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model

    for epoch in range(start, lc["epochs"]):
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        model.train()
        for batch in train_it.iter_torch_batches(
            batch_size=lc["batch_size"], device="cpu", local_shuffle_buffer_size=max(256, 4 * lc["batch_size"]),
            local_shuffle_seed=lc["seed"] * 1000 + epoch,
            dtypes={"image": torch.uint8, "label": torch.long, "sample_id": torch.long},
        ):
            x, y = view_batch(batch, epoch, lc["data_seed"], policy, lc["mean"], lc["std"], device)
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer_step(opt, sched, loss, model.parameters(), lc["optim"].get("grad_clip"))
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        dt = time.time() - t0
        val_acc, val_loss = evaluate(bare, val_x, val_y, lc["mean"], lc["std"], device)
        test_acc, _ = evaluate(bare, test_x, test_y, lc["mean"], lc["std"], device)
        m = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
             "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc, "lr": sched.get_last_lr()[0],
             "epoch_time_s": dt, "samples_per_s": seen * world / max(dt, 1e-9), "workers": world,
             "samples": seen * world}
        history.append(m)
        if rank == 0:
            emit(lc["progress"], f"[teacher {lc['name']}] epoch {epoch + 1}/{lc['epochs']} loss {m['train_loss']:.3f} "
                 f"val {val_acc:.4f} test {test_acc:.4f} ({dt:.1f}s, {m['samples_per_s']:.0f} samples/s)")
        report_epoch(m, {"model": bare.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "epoch": epoch, "history": json.dumps(history)} if rank == 0 else None)
    return history


# --------------------------------------------------------------------------------------------------
# driver


def _train_one(spec: TeacherSpec, cfg: Config, num_classes: int, in_chans: int, policy: dict, mean, std,
               n_train: int, datasets: dict, device: str, storage: str, fp: str, progress_queue, threads):
    """Runs in a Ray task: one teacher's TorchTrainer, start to end; returns its states and history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.raysetup import TRAIN_LOG_LEVEL, scaling

    t0 = time.time()
    w = cfg.teachers.workers
    lc = {
        "name": spec.name, "arch": spec.arch, "seed": spec.seed, "num_classes": num_classes, "in_chans": in_chans,
        "policy": policy, "data_seed": cfg.data.seed, "mean": mean, "std": std, "n_train": n_train,
        "batch_size": cfg.teachers.optim.batch_size, "epochs": spec.epochs or cfg.teachers.optim.epochs,
        "lr": spec.lr or cfg.teachers.optim.lr, "optim": cfg.teachers.optim.model_dump(),
        "progress": progress_queue, "torch_threads": threads,
    }
    use_gpu = device == "cuda"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=lc,
        scaling_config=scaling(w, use_gpu),
        run_config=ray.train.RunConfig(
            name=f"teacher-{spec.name}-{fp[:12]}",  # same name on a rerun = resume from the last checkpoint
            **storage,
            logging_config=ray.train.LoggingConfig(log_level=TRAIN_LOG_LEVEL),
            failure_config=ray.train.FailureConfig(max_failures=w.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_acc"], cm[1]["epoch"]))
    states = {}
    for tag, ck in (("best", best_ckpt), ("last", result.checkpoint)):
        states[tag] = checkpoint_state(ck)
    history = json.loads(states["last"]["history"])
    return states["best"]["model"], states["last"]["model"], best_metrics, history, time.time() - t0


def run_teachers(cfg: Config) -> list[dict]:
    """Train or load every configured teacher; returns their records (also written as teacher.json).

    Teachers to train run as concurrent Ray Train jobs (`teachers.parallel` at a time), each launched
    from a Ray task, so their start-up costs overlap; each record is written as soon as its job ends.
    """
    splits = load_splits(cfg.data)
    out = os.path.abspath(cfg.run.out_dir)
    os.makedirs(out, exist_ok=True)
    write_resolved(cfg, os.path.join(out, "teachers"))
    records: dict[str, dict] = {}
    to_train: list[tuple[TeacherSpec, str]] = []
    for spec in cfg.teachers.models:
        tdir = teacher_dir(out, spec.name)
        fp = teacher_fingerprint(spec, cfg, splits.fingerprint)
        rec = read_record(out, spec.name, verify=False)
        if rec is not None and rec.get("fingerprint") == fp and _files_intact(tdir, rec):
            print(f"[teachers] {spec.name}: up to date ({tdir}), not retrained", flush=True)
        elif spec.checkpoint:
            print(f"[teachers] {spec.name} ({spec.arch}): evaluating {spec.checkpoint}", flush=True)
            t0 = time.time()
            rec = _evaluate_given(spec, splits, _local_device(cfg.run.device), tdir)
            rec["wall_time_s"] = round(time.time() - t0, 2)
        else:
            to_train.append((spec, fp))
            continue
        records[spec.name] = _finalise(rec, fp, splits, cfg, tdir)
    if to_train:
        records.update(_train_all(cfg, splits, out, to_train))
    ordered = [records[s.name] for s in cfg.teachers.models]
    with open(os.path.join(out, "teachers", "summary.json"), "w") as f:
        json.dump(ordered, f, indent=2)
    return ordered


def _train_all(cfg: Config, splits: Splits, out: str, to_train) -> dict[str, dict]:
    import ray

    from pipeline.raysetup import init_ray, local_thread_share, resolve_device, train_storage

    init_ray(cfg.ray)
    device = resolve_device(cfg.run.device)
    parallel = min(cfg.teachers.parallel or len(to_train), len(to_train))
    # the concurrent jobs' workers share the machine's cores
    threads = cfg.teachers.workers.torch_threads or local_thread_share(
        cfg.ray, parallel * cfg.teachers.workers.num_workers)
    datasets = {"train": split_to_ray(splits.train), "val": split_to_ray(splits.val), "test": split_to_ray(splits.test)}
    fit = ray.remote(num_cpus=0, max_retries=0)(_train_one)  # Ray Train's FailureConfig handles worker faults
    storage = train_storage(cfg)
    records, failed, pending, queue = {}, [], {}, list(to_train)
    with ProgressPrinter() as progress:
        while queue or pending:
            while queue and len(pending) < parallel:
                spec, fp = queue.pop(0)
                print(f"[teachers] {spec.name} ({spec.arch}): training on Ray Train", flush=True)
                ref = fit.remote(spec, cfg, splits.num_classes, splits.in_chans, splits.policy.as_dict(), splits.mean,
                                 splits.std, len(splits.train), datasets, device, storage, fp, progress.queue, threads)
                pending[ref] = (spec, fp)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            spec, fp = pending.pop(ref)
            tdir = teacher_dir(out, spec.name)
            try:
                best, last, best_m, history, seconds = ray.get(ref)
            except ray.exceptions.RayError as e:
                failed.append(spec.name)
                print(f"[teachers] {spec.name}: FAILED: {str(e).strip().splitlines()[-1]}", flush=True)
                continue
            rec = _finish_trained(spec, splits, tdir, best, last, best_m, history)
            rec["wall_time_s"] = round(seconds, 2)
            records[spec.name] = _finalise(rec, fp, splits, cfg, tdir)
            print(f"[teachers] {spec.name}: done, val {rec['val_acc']:.4f} test {rec['test_acc']:.4f}", flush=True)
    if failed:
        raise StageFailed(f"teacher training failed for {', '.join(failed)}; the others are saved. "
                          "Ray's logs: /tmp/ray/session_latest/logs")
    return records


def _finalise(rec: dict, fp: str, splits: Splits, cfg: Config, tdir: str) -> dict:
    rec.update(fingerprint=fp, data_fingerprint=splits.fingerprint, num_classes=splits.num_classes,
               in_chans=splits.in_chans, image_size=splits.image_size)
    rec = _apply_gate(rec, cfg.teachers.min_val_acc)
    _write_record(tdir, rec)
    return rec


def _local_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but this machine has no GPU; use run.device=cpu or auto")
    return "cuda" if preference != "cpu" and torch.cuda.is_available() else "cpu"


def _finish_trained(spec, splits, tdir, best, last, best_m, history) -> dict:
    os.makedirs(tdir, exist_ok=True)
    with open(os.path.join(tdir, "metrics.jsonl"), "w") as f:
        for m in history:
            f.write(json.dumps(m) + "\n")
    model = build_model(spec.arch, splits.num_classes, splits.in_chans)
    model.load_state_dict(best)
    return {
        "name": spec.name, "arch": spec.arch, "seed": spec.seed, "source": "trained",
        "params": model.num_params(),
        "best": {"file": "best.safetensors", "sha256": save_state_dict(best, os.path.join(tdir, "best.safetensors")),
                 "epoch": best_m["epoch"]},
        "last": {"file": "last.safetensors", "sha256": save_state_dict(last, os.path.join(tdir, "last.safetensors")),
                 "epoch": history[-1]["epoch"]},
        "val_acc": best_m["val_acc"], "test_acc": best_m["test_acc"], "epochs": len(history),
    }


def _evaluate_given(spec, splits, device, tdir) -> dict:
    model = build_model(spec.arch, splits.num_classes, splits.in_chans)
    try:
        state = load_state_dict(spec.checkpoint)
        load_into(model, state, spec.checkpoint, spec.arch)
    except CheckpointError as e:
        hint = ""
        if "size mismatch for" in str(e):
            hint = f" (the data set {splits.name} has {splits.num_classes} classes, {splits.in_chans} channel(s))"
        raise CheckpointError(f"teacher {spec.name!r} (teachers.models[].checkpoint): {e}{hint}") from None
    model.to(device)
    val_acc, _ = evaluate(model, torch.from_numpy(splits.val.images), torch.from_numpy(splits.val.labels),
                          splits.mean, splits.std, device)
    test_acc, _ = evaluate(model, torch.from_numpy(splits.test.images), torch.from_numpy(splits.test.labels),
                           splits.mean, splits.std, device)
    sha = save_state_dict(state, os.path.join(tdir, "best.safetensors"))
    return {"name": spec.name, "arch": spec.arch, "seed": spec.seed, "source": os.path.abspath(spec.checkpoint),
            "source_sha256": sha256_file(spec.checkpoint), "params": model.num_params(),
            "best": {"file": "best.safetensors", "sha256": sha}, "val_acc": val_acc, "test_acc": test_acc}


def _apply_gate(rec: dict, min_val_acc: float) -> dict:
    rec["gate"] = {"min_val_acc": min_val_acc, "passed": rec["val_acc"] >= min_val_acc}
    return rec


def _write_record(tdir: str, rec: dict) -> None:
    os.makedirs(tdir, exist_ok=True)
    tmp = os.path.join(tdir, RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(tmp, os.path.join(tdir, RECORD))


def _files_intact(tdir: str, rec: dict) -> bool:
    try:
        return all(sha256_file(os.path.join(tdir, rec[k]["file"])) == rec[k]["sha256"] for k in ("best", "last") if k in rec)
    except OSError:
        return False


def read_record(out_dir: str, name: str, verify: bool = True) -> dict | None:
    path = os.path.join(teacher_dir(out_dir, name), RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        if verify:
            raise CheckpointError(f"teacher record {path} is unreadable: {e}") from None
        return None
    return rec


def load_teacher(out_dir: str, name: str, for_cache: bool = True) -> tuple[torch.nn.Module, dict]:
    """The best checkpoint of a teacher, verified against its sha256; refused if it failed the accuracy gate."""
    rec = read_record(out_dir, name)
    if rec is None:
        raise RaykdError(f"teacher {name!r} has no record under {teacher_dir(out_dir, name)}: run `raykd teachers` first")
    if for_cache and not rec["gate"]["passed"]:
        raise RaykdError(
            f"teacher {name!r} is below the accuracy gate (val {rec['val_acc']:.4f} < teachers.min_val_acc "
            f"{rec['gate']['min_val_acc']}) and may not be cached")
    path = os.path.join(teacher_dir(out_dir, name), rec["best"]["file"])
    model = build_model(rec["arch"], rec["num_classes"], rec["in_chans"])
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
