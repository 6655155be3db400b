"""Test accuracy of every method over several seeds, all students distilled from one cache.

    python bench/accuracy.py -c configs/fashion_mnist.yaml [--seeds 0 1 2] [--methods ce kd ...] [key=value ...]

Teachers, cache and (when a method needs it) the professor are built first or reused; then one
student per (method, seed) with `raykd distill` (students `run.parallel` at a time), the seed being the
student's initialisation and shuffling seed (the cache, hence the views, stays the same). Prints a
Markdown table (mean +- sample std over seeds) and writes bench/results/accuracy_<dataset>.json.
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

from pipeline.cache import build_cache  # noqa: E402
from pipeline.config import load_config, variant  # noqa: E402
from pipeline.distill import run_students  # noqa: E402
from pipeline.teachers import run_teachers  # noqa: E402

VARIANTS = {
    "ce": {"method.name": "ce"},
    "kd": {"method.name": "kd"},
    "dkd": {"method.name": "dkd"},
    "aekt": {"method.name": "aekt"},
    "skd": {"method.name": "skd"},
    "professor_kd": {"method.name": "kd", "method.targets": "both"},
}


def _stat(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None, help="default bench/results/accuracy_<dataset>.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    teachers = run_teachers(cfg)
    manifest = build_cache(cfg)
    runs = {m: [variant(cfg, {**VARIANTS[m], "distill.student.seed": s, "distill.name": f"acc-{m}-s{s}"},
                        f"bench method {m}") for s in args.seeds] for m in args.methods}
    if any(r.method.targets != "teachers" for rs in runs.values() for r in rs):
        from pipeline.professor import run_professor

        prof = run_professor(cfg)
    else:
        prof = None
    flat = [r for rs in runs.values() for r in rs]
    records = iter(run_students(flat, cfg.run.parallel))
    rows = {}
    for m, rs in runs.items():
        recs = [next(records) for _ in rs]
        test, val = _stat([r["test_acc"] for r in recs]), _stat([r["val_acc"] for r in recs])
        rows[m] = {"test_acc_mean": round(test[0], 5), "test_acc_std": round(test[1], 5),
                   "val_acc_mean": round(val[0], 5), "val_acc_std": round(val[1], 5),
                   "params": recs[0]["params"],
                   # students share the cores (run.parallel at a time): not a speed figure, see distill_speed
                   "epoch_time_s": round(statistics.median(r["epoch_time_s"] for r in recs), 2),
                   "per_seed": {s: r["test_acc"] for s, r in zip(args.seeds, recs)}}
    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "train_samples": manifest["dataset"]["train_samples"], "views": manifest["views"],
        "student": cfg.distill.student.arch, "epochs": cfg.distill.optim.epochs, "batch_size": cfg.distill.optim.batch_size,
        "seeds": args.seeds, "teachers": {t["name"]: {"arch": t["arch"], "test_acc": t["test_acc"]} for t in teachers},
        "professor_refined_acc": prof["refined_acc"] if prof else None, "methods": rows,
        "wall_time_s": round(time.time() - t0, 1),
    }
    out = args.out or f"bench/results/accuracy_{cfg.data.name.replace('-', '_')}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| method | test acc (mean ± std, {len(args.seeds)} seeds) | val acc | student params |")
    print("|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
              f"{100 * r['val_acc_mean']:.2f} ± {100 * r['val_acc_std']:.2f} | {r['params']:,} |")
    print(f"\nwritten {out} ({res['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
