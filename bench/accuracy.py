"""Test accuracy of every method over several seeds, all students distilled from one cache.

    python bench/accuracy.py -c configs/fashion_mnist.yaml [--seeds 0 1 2] [--methods ce kd ...] [key=value ...]

Teachers, cache and (when a method needs it) the professor are built first or reused; then one
student per (method, seed) with `raykd distill` (students `run.parallel` at a time), the seed being the
student's initialisation and shuffling seed (the cache, hence the views, stays the same). Prints a
Markdown table (mean +- sample std over seeds) and writes bench/results/accuracy_<dataset>.json.
With `--into FILE`, the rows of the methods run replace theirs in an earlier result FILE (the rest of it
is kept), and FILE's `reruns` list records this command: how one method is rerun after a change to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cache import Cache, build_cache, cache_uri  # noqa: E402
from pipeline.config import load_config, variant  # noqa: E402
from pipeline.distill import run_students, student_dir  # noqa: E402
from pipeline.teachers import run_teachers  # noqa: E402

# method -> config changes; "<best>" is the teacher with the best validation accuracy
VARIANTS = {
    "ce": {"method.name": "ce"},
    "kd_best": {"method.name": "kd", "method.teachers": "<best>"},
    "kd": {"method.name": "kd"},
    "kd_online": {"method.name": "kd", "distill.teachers": "online"},
    "dkd": {"method.name": "dkd"},
    "aekt": {"method.name": "aekt"},
    "skd": {"method.name": "skd"},
    "professor_kd": {"method.name": "kd", "method.targets": "both"},
    "pfeed": {"method.name": "feed"},
    "sfeed": {"method.name": "feed", "method.feed.generations": 2},
    "imf": {"method.name": "imf"},
}
SLOW = ("kd_online",)  # started first so that they do not run alone at the end


def _stat(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _row(recs: list[dict], seeds: list[int], key=lambda r: r) -> dict:
    """Mean and std over seeds of test (and, when recorded, val) accuracy."""
    row = {"per_seed": {s: key(r)["test_acc"] for s, r in zip(seeds, recs)}}
    for split in ("test", "val"):
        if all(f"{split}_acc" in key(r) for r in recs):
            mean, std = _stat([key(r)[f"{split}_acc"] for r in recs])
            row.update({f"{split}_acc_mean": round(mean, 5), f"{split}_acc_std": round(std, 5)})
    return row


def _curve(cfg, rec: dict) -> list[float]:
    """Validation accuracy per epoch of a finished student (its metrics.jsonl)."""
    path = os.path.join(student_dir(variant(cfg, {"distill.name": rec["name"]}, "bench")), "metrics.jsonl")
    return [round(json.loads(line)["val_acc"], 5) for line in open(path)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None, help="default bench/results/accuracy_<dataset>.json")
    ap.add_argument("--into", default=None, help="replace these methods' rows in this earlier result file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    teachers = run_teachers(cfg)
    t_teachers = time.time() - t0
    manifest = build_cache(cfg)
    t_cache = time.time() - t0 - t_teachers
    best = max(teachers, key=lambda t: t["val_acc"])["name"]

    def changes(m: str, s: int) -> dict:
        ch = {k: ([best] if v == "<best>" else v) for k, v in VARIANTS[m].items()}
        return {**ch, "distill.student.seed": s, "distill.name": f"acc-{m}-s{s}"}

    runs = {m: [variant(cfg, changes(m, s), f"bench method {m}") for s in args.seeds] for m in args.methods}
    prof = None
    if any(r.method.targets != "teachers" for rs in runs.values() for r in rs):
        from pipeline.professor import run_professor

        prof = run_professor(cfg)
    order = sorted(runs, key=lambda m: m not in SLOW)
    flat = [r for m in order for r in runs[m]]
    t1 = time.time()
    records = iter(run_students(flat, cfg.run.parallel))
    t_students = time.time() - t1
    recs = {m: [next(records) for _ in runs[m]] for m in order}
    rows = {}
    for m in args.methods:
        rs = recs[m]
        rows[m] = {**_row(rs, args.seeds), "params": rs[0]["params"],
                   # wall time per student, students sharing the cores (run.parallel at a time)
                   "train_time_s": round(statistics.median(r["wall_time_s"] for r in rs), 1),
                   "epoch_time_s": round(statistics.median(r["epoch_time_s"] for r in rs), 2),
                   "val_curve": [round(statistics.mean(c), 5) for c in zip(*(_curve(cfg, r) for r in rs))]}
        if m == "kd_best":
            rows[m]["teacher"] = best
        if "inference" in rs[0]:  # IMF: the exported inference model
            inf = [r["inference"] for r in rs]
            rows[m]["inference"] = {**_row(inf, args.seeds), "params": inf[0]["params"], "flops": inf[0]["flops"],
                                    "student_flops": inf[0]["student_flops"]}
        if "generations" in rs[0]:  # sequential FEED: every generation
            rows[m]["generations"] = [_row(rs, args.seeds, key=lambda r, g=g: r["generations"][g])
                                      for g in range(len(rs[0]["generations"]))]
    cols = Cache(cache_uri(cfg), cfg.cache.s3_endpoint).column_bytes()
    feat = sum(b for c, b in cols.items() if c.startswith("feat."))
    n = manifest["dataset"]["train_samples"]
    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "train_samples": n, "views": manifest["views"],
        "student": cfg.distill.student.arch, "epochs": cfg.distill.optim.epochs, "batch_size": cfg.distill.optim.batch_size,
        "parallel": cfg.run.parallel, "seeds": args.seeds,
        "teachers": {t["name"]: {"arch": t["arch"], "params": t.get("params"), "val_acc": t["val_acc"],
                                 "test_acc": t["test_acc"]} for t in teachers},
        "best_teacher": best, "professor_refined_acc": prof["refined_acc"] if prof else None,
        "cache": {"bytes": manifest["bytes"], "feat_dtype": cfg.cache.feat_dtype, "layers": cfg.cache.layers,
                  "bytes_per_sample": round(manifest["bytes"] / n, 1),
                  "bytes_per_sample_without_features": round((manifest["bytes"] - feat) / n, 1),
                  "bytes_per_column": cols, "build_s": round(manifest["build_seconds"], 1)},
        "methods": rows,
        "time_s": {"teachers": round(t_teachers, 1), "cache": round(t_cache, 1), "students": round(t_students, 1),
                   "total": round(time.time() - t0, 1)},
    }
    out = args.into or args.out or f"bench/results/accuracy_{cfg.data.name.replace('-', '_')}.json"
    if args.into:
        with open(args.into) as f:
            earlier = json.load(f)
        earlier["methods"].update(rows)
        earlier.setdefault("reruns", []).append({"command": cmd, "date": res["date"], "methods": list(rows),
                                                 "time_s": res["time_s"]})
        res = earlier
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| method | test acc (mean ± std, {len(args.seeds)} seeds) | val acc | student params |")
    print("|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
              f"{100 * r['val_acc_mean']:.2f} ± {100 * r['val_acc_std']:.2f} | {r['params']:,} |")
    print(f"\nwritten {out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
