"""Plateau probe: CE and KD (the teachers' mean probability) trained twice the regime's epochs (by default),
on the regime's logits cache (K = the regime's epochs; a longer run reads each view more than once) and
teachers (run `make bench` first), 5 seeds.

    python bench/plateau.py [--epochs N] [--out bench/results/full/plateau.json]

Tells whether the regime's students were trained long enough: if twice the epochs moves CE or KD (or
the gap between them), the regime's epochs were too few; `bench/report.py` reads plateau.json for that
target. plateau-16.json is the probe of the former 16-epoch regime at 32 epochs, which moved CE by
3 points and so set today's regime to 32. Students already trained are reused.
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


def on_regime_logits(cfg) -> dict:
    """Overrides that train a student on the regime's logits cache (K = its epochs) and teachers, as
    `make bench` left them (bench/accuracy.py --teachers-on-all-data)."""
    out_dir = os.path.abspath(cfg.run.out_dir)
    base = {f"teachers.models.{i}.checkpoint": os.path.join(out_dir + "-teachers", "teachers", t.name, "best.safetensors")
            for i, t in enumerate(cfg.teachers.models)}
    return {**base, "cache.uri": os.path.join(out_dir, "cache-logits"), "cache.views": cfg.distill.optim.epochs,
            "cache.layers": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="default: twice the regime's distill.optim.epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="bench/results/full/plateau.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    args.epochs = args.epochs or 2 * cfg.distill.optim.epochs
    base = {**on_regime_logits(cfg), "distill.optim.epochs": args.epochs}
    cfgs = [variant(cfg, {**base, "method.name": m, "distill.student.seed": s,
                          "distill.name": f"plateau{args.epochs}-{m}-s{s}"}, "plateau probe")
            for m in ("ce", "kd") for s in args.seeds]
    recs = run_students(cfgs, cfg.run.parallel)
    res = {"command": "python bench/plateau.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "regime_epochs": cfg.distill.optim.epochs,
           "regime_batch_size": cfg.distill.optim.batch_size, "regime_lr": cfg.distill.optim.lr,
           "seeds": args.seeds, "methods": {}}
    for m in ("ce", "kd"):
        rs = [r for c, r in zip(cfgs, recs) if c.method.name == m]
        curves = [[json.loads(line)["val_acc"] for line in open(os.path.join(student_dir(variant(
            cfg, {"distill.name": r["name"]}, "plateau")), "metrics.jsonl"))] for r in rs]
        accs = [r["test_acc"] for r in rs]
        res["methods"][m] = {"per_seed": dict(zip(args.seeds, accs)), "test_acc_mean": round(statistics.mean(accs), 5),
                             "test_acc_std": round(statistics.stdev(accs), 5),
                             "val_curve": [round(statistics.mean(v), 5) for v in zip(*curves)]}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print({m: (r["test_acc_mean"], r["test_acc_std"]) for m, r in res["methods"].items()}, "->", args.out)


if __name__ == "__main__":
    main()
