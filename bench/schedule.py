"""Schedule probe: which (batch size, peak learning rate) lets the regime's student converge in its epochs?
CE students (and, with `--methods`, KD from the teachers' mean probability) on the regime's logits cache and teachers (run `make bench` first) at the regime's epochs
and at twice them, 2 seeds per setting; the gain from doubling, paired by seed, is what a setting leaves
on the table (the plateau target asks ≤ 0.5 points).

    python bench/schedule.py [--grid 128:0.05 64:0.05 128:0.2 128:0.4 64:0.2] [--seeds 0 1] [--methods ce kd]
                             [--out bench/results/full/schedule.json]

Students already trained are reused (by name and fingerprint).
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

from pipeline.config import load_config, variant  # noqa: E402
from pipeline.distill import run_students, student_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench.yaml")
    ap.add_argument("--grid", nargs="+", default=["128:0.05", "64:0.05", "128:0.2", "128:0.4", "64:0.2"],
                    help="batch_size:lr settings")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=["ce"], choices=["ce", "kd"])
    ap.add_argument("--out", default="bench/results/full/schedule.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    epochs = cfg.distill.optim.epochs
    out_dir = os.path.abspath(cfg.run.out_dir)
    base = {f"teachers.models.{i}.checkpoint": os.path.join(out_dir + "-teachers", "teachers", t.name, "best.safetensors")
            for i, t in enumerate(cfg.teachers.models)}
    base.update({"cache.uri": os.path.join(out_dir, "cache-logits"), "cache.views": epochs, "cache.layers": {}})
    runs = [(m, g, e, s) for m in args.methods for g in args.grid for e in (epochs, 2 * epochs) for s in args.seeds]
    cfgs = []
    for m, g, e, s in runs:
        bs, lr = g.split(":")
        cfgs.append(variant(cfg, {**base, "method.name": m, "distill.optim.batch_size": int(bs),
                                  "distill.optim.lr": float(lr), "distill.optim.epochs": e, "distill.student.seed": s,
                                  "distill.name": f"sched-{m}-b{bs}-lr{lr}-e{e}-s{s}"}, "schedule probe"))
    recs = run_students(cfgs, cfg.run.parallel)
    res = {"command": "python bench/schedule.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "student": cfg.distill.student.arch,
           "epochs": [epochs, 2 * epochs], "seeds": args.seeds, "settings": {}}
    for m, g in [(m, g) for m in args.methods for g in args.grid]:
        acc, train_s = {}, {}
        for (mm, gg, e, s), c, r in zip(runs, cfgs, recs):
            if (mm, gg) == (m, g):
                acc.setdefault(e, {})[s] = r["test_acc"]
                with open(os.path.join(student_dir(c), "metrics.jsonl")) as f:
                    train_s.setdefault(e, []).append(sum(json.loads(line)["epoch_time_s"] for line in f) / e)
        gains = [acc[2 * epochs][s] - acc[epochs][s] for s in args.seeds]
        res["settings"][f"{m} {g}"] = {
            "test_acc": {e: {"per_seed": a, "mean": round(statistics.mean(a.values()), 5)} for e, a in acc.items()},
            "gain_from_doubling": {"per_seed": [round(x, 5) for x in gains], "mean": round(statistics.mean(gains), 5)},
            "train_s_per_epoch": round(statistics.median(train_s[epochs] + train_s[2 * epochs]), 3)}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    for g, r in res["settings"].items():
        print(f"method batch:lr {g}: {100 * r['test_acc'][epochs]['mean']:.2f} at {epochs} epochs, "
              f"{100 * r['test_acc'][2 * epochs]['mean']:.2f} at {2 * epochs} "
              f"(gain {100 * r['gain_from_doubling']['mean']:+.2f}), {r['train_s_per_epoch']:.2f} s/epoch")
    print("->", args.out)


if __name__ == "__main__":
    main()
