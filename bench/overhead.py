"""Where the time of one `raykd distill` goes, beside the floor: a bare PyTorch loop doing the same work.

    python bench/overhead.py -c configs/demo.yaml --epochs 12 --out bench/results/overhead/digits.json
    python bench/overhead.py -c configs/bench_speed.yaml --views 2 --epochs 4 --out ... teachers.optim.epochs=1 'cache.layers={}'

The floor (`--floor`, run as its own process) is the same student (same zoo model, seed and method
loss, SGD with the same schedule, batch size and torch threads) trained on the same cached views and
teacher logits, read once with pyarrow into in-memory tensors, shuffled with `torch.randperm` and
batched by slicing, evaluated on the val and test splits after every epoch as raykd does; no Ray.

Both run as whole processes, in turn (`--rounds` pairs), so their ratios are pair by pair on the same
machine state. For raykd the phases come from the wall-clock time of each line it prints (start-up up
to its first line; the job's start up to the first epoch line; each epoch's training loop from
metrics.jsonl, the rest of the epoch line's interval being evaluation, checkpoint and report; the end)
and, when the student record has it, its own `profile` of the phases. The read path alone (rows/s of
one cache view into torch batches, raykd's reader and Ray Data's `iter_torch_batches`) is set beside
the student's own training rate. Teachers and the cache are built first when missing (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

T_START = time.time()  # as close to the process start as Python allows (the floor's wall includes imports)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------------------------------
# the floor: a bare loop, in its own process


def floor(cfg_path: str, overrides: list[str], epochs: int, out: str) -> None:
    import numpy as np
    import torch

    t_import = time.time()
    from raykd.methods import MethodContext, Targets, build_method
    from raykd.pipeline.cache import Cache, cache_uri, column_array
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.datasets import normalize
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.harness.training import lr_lambda
    from raykd.pipeline.models.zoo import build_model

    cfg = load_config(cfg_path, overrides)
    d, o = cfg.distill, cfg.distill.optim
    torch.set_num_threads(d.workers.torch_threads or os.cpu_count() or 1)
    seed = cfg.run.seed if d.student.seed is None else d.student.seed
    torch.manual_seed(seed)
    splits = load_splits(cfg.data)
    cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint)
    teachers = cfg.method.teachers or cache.teachers
    t_data = time.time()
    views = {}
    for k in sorted({e % cache.manifest["views"] for e in range(epochs)}):
        t = cache.read_table(["label", "pixels", *[f"logits.{n}" for n in teachers]], views=[k])
        views[k] = (normalize(torch.from_numpy(column_array(t, "pixels")), splits.mean, splits.std),
                    torch.from_numpy(column_array(t, "label").astype(np.int64)),
                    {n: torch.from_numpy(column_array(t, f"logits.{n}").astype(np.float32)) for n in teachers})
    val = (normalize(torch.from_numpy(splits.val.images), splits.mean, splits.std), torch.from_numpy(splits.val.labels))
    test = (normalize(torch.from_numpy(splits.test.images), splits.mean, splits.std), torch.from_numpy(splits.test.labels))
    t_read = time.time()
    student = build_model(d.student.arch, splits.num_classes, splits.in_chans)
    method = build_method(cfg.method, MethodContext(num_classes=splits.num_classes, teachers=teachers, epochs=epochs))
    n = len(splits.train)
    steps = -(-n // o.batch_size)
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, steps * epochs, steps, o.milestones, o.gamma))
    epoch_s, eval_s, accs = [], [], []
    for epoch in range(epochs):
        x_all, y_all, z_all = views[epoch % cache.manifest["views"]]
        t0 = time.time()
        student.train()
        perm = torch.randperm(n)
        for s in range(0, n, o.batch_size):
            idx = perm[s:s + o.batch_size]
            x, y = x_all[idx], y_all[idx]
            logits, stages = student.forward_stages(x)
            terms = method(logits, stages, Targets(logits={t: z[idx] for t, z in z_all.items()}), y, epoch + 1)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sched.step()
        epoch_s.append(time.time() - t0)
        t0 = time.time()
        student.eval()
        with torch.no_grad():
            acc = [float((torch.cat([student(xs[i:i + 1024]).argmax(1) for i in range(0, len(xs), 1024)]) == ys)
                         .float().mean()) for xs, ys in (val, test)]
        accs.append(acc)
        eval_s.append(time.time() - t0)
    res = {"import_s": round(t_import - T_START, 3), "setup_s": round(t_data - t_import, 3),
           "read_s": round(t_read - t_data, 3), "epoch_s": [round(t, 4) for t in epoch_s],
           "eval_s": [round(t, 4) for t in eval_s], "val_acc": accs[-1][0], "test_acc": accs[-1][1],
           "rows": n, "in_process_wall_s": round(time.time() - T_START, 3)}
    with open(out, "w") as f:
        json.dump(res, f)


# --------------------------------------------------------------------------------------------------
# raykd, timed from outside by the lines it prints


def run_raykd(cfg_path: str, overrides: list[str], epochs: int, name: str) -> dict:
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.distill import student_dir

    args = [os.path.join(os.path.dirname(sys.executable), "raykd"), "distill", "-c", cfg_path, *overrides,
            f"distill.optim.epochs={epochs}", f"distill.name={name}"]
    sdir = student_dir(load_config(cfg_path, [*overrides, f"distill.name={name}"]))
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = [(time.time() - t0, ln.rstrip()) for ln in proc.stdout]
    if proc.wait() != 0:
        sys.exit("raykd distill failed:\n" + "\n".join(ln for _, ln in lines[-30:]))
    wall = time.time() - t0
    first = next(t for t, ln in lines if ln.startswith("[distill]"))
    epoch_lines = [t for t, ln in lines if ln.startswith(f"[distill {name}] epoch ")]
    done = next(t for t, ln in lines if ln.startswith(f"[distill] {name}: done"))
    ms = [json.loads(x) for x in open(os.path.join(sdir, "metrics.jsonl"))]
    rec = json.load(open(os.path.join(sdir, "student.json")))
    train = [m["epoch_time_s"] for m in ms]
    gaps = [b - a for a, b in zip(epoch_lines, epoch_lines[1:])]
    return {
        "wall_s": round(wall, 3),
        "startup_s": round(first, 3),  # imports, data load + fingerprint, cache open, ray.init
        "to_first_epoch_s": round(epoch_lines[0] - first, 3),  # job start, data setup, epoch 1 + its evaluation
        "epoch_train_s": [round(t, 4) for t in train],  # each epoch's training loop (metrics.jsonl)
        # each later epoch's line-to-line interval minus its training loop: data start, evaluation, report
        "epoch_other_s": [round(g - t, 4) for g, t in zip(gaps, train[1:])],
        "finish_s": round(done - epoch_lines[-1], 3),  # outputs written, job torn down
        "teardown_s": round(wall - done, 3),  # after the last line: Ray shutdown, process exit
        "profile": rec.get("profile"),
        "val_acc": rec["val_acc"], "test_acc": rec["test_acc"],
    }


def read_path(cfg, epochs: int) -> dict:
    """Rows/s of one cache view into torch batches of the student's size: Ray Data's iter_torch_batches,
    and raykd's own reader when it has one (`raykd.pipeline.cache.epochs.read_view`)."""
    import ray

    from raykd.pipeline.cache import Cache, cache_uri
    from raykd.pipeline.harness.raysetup import init_ray

    init_ray(cfg)
    cache = Cache(cache_uri(cfg), cfg.cache.s3_endpoint)
    teachers = cfg.method.teachers or cache.teachers
    cols = ["sample_id", "label", "pixels", *[f"logits.{n}" for n in teachers]]
    out = {}
    rows = cache.manifest["dataset"]["train_samples"]
    t0 = time.time()
    for _ in cache.view_dataset(0, cols).iter_torch_batches(batch_size=cfg.distill.optim.batch_size,
                                                           local_shuffle_buffer_size=cfg.distill.shuffle_buffer or None):
        pass
    out["ray_data_iter_torch_batches_rows_per_s"] = round(rows / (time.time() - t0), 1)
    try:
        from raykd.pipeline.cache.epochs import read_view
    except ImportError:
        read_view = None
    if read_view is not None:
        t0 = time.time()
        read_view(cache.fs, cache.view_files(0), cols)
        out["raykd_read_view_rows_per_s"] = round(rows / (time.time() - t0), 1)
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--views", type=int, help="cache.views (K) of the cache the benchmark builds or reuses")
    ap.add_argument("--rounds", type=int, default=2, help="floor/raykd pairs, in turn")
    ap.add_argument("--method", default="kd")
    ap.add_argument("--out", default="bench/results/overhead/digits.json")
    ap.add_argument("--floor", metavar="JSON", help=argparse.SUPPRESS)  # internal: run the floor, write JSON
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [*args.overrides, f"method.name={args.method}", "distill.teachers=cache"]
    if args.views:
        overrides.append(f"cache.views={args.views}")
    if args.floor:
        return floor(args.config, overrides, args.epochs, args.floor)
    cmd = "python bench/overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.teachers import run_teachers

    cfg = load_config(args.config, overrides)
    run_teachers(cfg)
    manifest = build_cache(cfg)
    import ray

    ray.shutdown()  # each side starts from nothing, as a user's command does
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pairs = []
    for r in range(args.rounds):
        fjson = os.path.join("/tmp", f"raykd-floor-{stamp}-{r}.json")
        t0 = time.time()
        subprocess.run([sys.executable, os.path.abspath(__file__), "-c", args.config, "--epochs", str(args.epochs),
                        "--method", args.method, *(["--views", str(args.views)] if args.views else []),
                        "--floor", fjson, *args.overrides], cwd=ROOT, check=True)
        fl = {"wall_s": round(time.time() - t0, 3), **json.load(open(fjson))}
        rk = run_raykd(args.config, overrides, args.epochs, f"overhead-{stamp}-{r}")
        print(f"[overhead] round {r + 1}: floor {fl['wall_s']:.1f}s (epoch {statistics.median(fl['epoch_s']):.3f}s), "
              f"raykd {rk['wall_s']:.1f}s (epoch {statistics.median(rk['epoch_train_s']):.3f}s)", flush=True)
        pairs.append({"floor": fl, "raykd": rk})
    med = statistics.median

    def later(xs):  # every epoch but the first (warm-up), when there are others
        return xs[1:] or xs

    ratios_epoch = [med(later(p["raykd"]["epoch_train_s"])) / med(later(p["floor"]["epoch_s"])) for p in pairs]
    ratios_wall = [p["raykd"]["wall_s"] / p["floor"]["wall_s"] for p in pairs]
    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "train_rows": manifest["dataset"]["train_samples"], "views": manifest["views"],
        "student": cfg.distill.student.arch, "method": args.method, "batch_size": cfg.distill.optim.batch_size,
        "epochs": args.epochs, "teachers": manifest and [t["name"] for t in manifest["teachers"]],
        "pairs": pairs,
        "epoch_ratio_per_pair": [round(x, 3) for x in ratios_epoch],
        "wall_ratio_per_pair": [round(x, 3) for x in ratios_wall],
        "epoch_ratio": round(med(ratios_epoch), 3), "wall_ratio": round(med(ratios_wall), 3),
        "read_path": read_path(cfg, args.epochs),
    }
    rows = res["train_rows"]
    res["student_rows_per_s"] = round(rows / med([med(later(p["raykd"]["epoch_train_s"])) for p in pairs]), 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    p = pairs[-1]["raykd"]
    print(f"\n{cfg.data.name}, {rows} rows, {args.epochs} epochs: epoch ratio {res['epoch_ratio']} "
          f"(pairs {res['epoch_ratio_per_pair']}), whole-command ratio {res['wall_ratio']} (pairs {res['wall_ratio_per_pair']})\n"
          f"raykd (last round): start-up {p['startup_s']:.1f}s, to first epoch {p['to_first_epoch_s']:.1f}s, "
          f"epoch loop {med(p['epoch_train_s']):.3f}s + {med(p['epoch_other_s'] or [0]):.3f}s other per epoch, "
          f"finish {p['finish_s']:.1f}s, teardown {p['teardown_s']:.1f}s\n"
          f"read path: {res['read_path']}; student {res['student_rows_per_s']} rows/s\nwritten {args.out}")


if __name__ == "__main__":
    main()
