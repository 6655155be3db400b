"""Epoch time of cached KD, CE only and online KD on the same student, batch size and views, in one run.

    python bench/distill_speed.py -c configs/fashion_mnist.yaml [--epochs 4 --rounds 2 --online-epochs 2] [key=value ...]

All three are `raykd distill` runs (one worker, in the command's own process): CE reads the cache's views without teacher
columns, cached KD reads the views and every teacher's fp16 logits, online KD renders the same views
from the source images and runs every teacher inside the worker. The epoch time is the training
loop's wall time per epoch (evaluation excluded). Epoch times of one run vary by +-10 % on this
machine, so CE and cached KD run alternately (`--rounds` times each) and each mode's figure is the
median over all its epochs but every run's first (its data pipeline's warm-up). The teachers and the
cache are built first when missing (reused when present). Writes bench/results/distill_speed.json.
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

from raykd.pipeline.cache import build_cache  # noqa: E402
from raykd.pipeline.core.config import load_config, variant  # noqa: E402
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.students import run_distill  # noqa: E402
from raykd.pipeline.stages.teachers import run_teachers  # noqa: E402

MODES = {
    "ce": {"method.name": "ce"},
    "kd_cached": {"method.name": "kd"},
    "kd_online": {"method.name": "kd", "distill.teachers": "online"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each CE and cached-KD run")
    ap.add_argument("--rounds", type=int, default=2, help="CE and cached-KD runs, alternating")
    ap.add_argument("--online-epochs", type=int, default=2, help="epochs of the (slow) online-KD run")
    ap.add_argument("--out", default="bench/results/distill_speed.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/distill_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(args.config, args.overrides)
    run_teachers(cfg)
    n_train = build_cache(cfg)["dataset"]["train_samples"]
    schedule = [m for _ in range(args.rounds) for m in ("ce", "kd_cached")] + ["kd_online"]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i, mode in enumerate(schedule):
        epochs = args.online_epochs if mode == "kd_online" else args.epochs
        c = variant(cfg, {**MODES[mode], "distill.name": f"bench-speed-{mode}-{stamp}-{i}",
                          "distill.optim.epochs": epochs}, f"bench mode {mode}")
        rec = run_distill(c)
        ms = [json.loads(x) for x in open(os.path.join(student_dir(c), "metrics.jsonl"))]
        runs[mode].append({"epoch_times_s": [round(m["epoch_time_s"], 2) for m in ms], "test_acc": rec["test_acc"],
                           "wall_time_s": rec["wall_time_s"]})
    rows = {}
    for mode, rs in runs.items():
        # every run's first epoch is its warm-up (kept only when a mode has nothing else)
        times = [t for r in rs for t in r["epoch_times_s"][1:]] or [t for r in rs for t in r["epoch_times_s"]]
        rows[mode] = {"runs": rs, "median_epoch_s": round(statistics.median(times), 2),
                      "samples_per_s": round(n_train / statistics.median(times), 1)}
    ce = rows["ce"]["median_epoch_s"]
    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "student": cfg.distill.student.arch, "batch_size": cfg.distill.optim.batch_size,
        "epochs": args.epochs, "rounds": args.rounds, "online_epochs": args.online_epochs,
        "teachers": [t.name for t in cfg.teachers.models], "modes": rows,
        "kd_cached_over_ce": round(rows["kd_cached"]["median_epoch_s"] / ce, 3), "target_kd_cached_over_ce": 1.05,
        "kd_online_over_ce": round(rows["kd_online"]["median_epoch_s"] / ce, 2),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("\n| mode | runs | median epoch s | samples/s | ratio to CE |\n|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {len(r['runs'])} | {r['median_epoch_s']:.2f} | {r['samples_per_s']:.0f} | "
              f"{r['median_epoch_s'] / ce:.3f} |")
    print(f"\ncached-KD / CE = {res['kd_cached_over_ce']} (target <= 1.05); online-KD / CE = {res['kd_online_over_ce']}\n"
          f"written {args.out}")


if __name__ == "__main__":
    main()
