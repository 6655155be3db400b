"""Plateau probe: CE and KD (the teachers' mean probability), and any other rows of bench/accuracy.py,
trained twice the regime's epochs (by default) on the regime's caches (the logits one has K = the regime's
epochs: a longer run reads each view more than once) and teachers (run `make bench` first), 5 seeds.

    python bench/plateau.py [--epochs N] [--methods ce kd ...] [--out bench/results/fm10/plateau.json]
    python bench/plateau.py -c configs/bench100.yaml --one-cache --regime bench/results/full/accuracy.json \
        --out bench/results/full/plateau.json        # the 100-class regime of `make bench`

Tells whether the regime's students were trained long enough: if twice the epochs moves CE or KD (or
the gap between them), the regime's epochs were too few; `bench/report.py` reads plateau.json for that
target, and for the other rows probed, whether their differences to CE and KD hold at twice the
epochs. plateau-16.json is the probe of the former 16-epoch regime at 32 epochs, which moved CE by 3
points and so set today's regime to 32. Students already trained are reused.
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

from raykd.pipeline.core.config import load_config, variant  # noqa: E402
from raykd.pipeline.stages.students import run_students  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import FEATURES, LOGITS, SLOW, VARIANTS, _curve, _row, row_changes  # noqa: E402  (bench/accuracy.py)
from stats import paired  # noqa: E402  (bench/stats.py)


def on_regime_teachers(cfg) -> dict:
    """Overrides that load the regime's teachers as `make bench` left them (bench/accuracy.py
    --teachers-on-all-data): a student with only these reads the regime's feature cache."""
    from raykd.pipeline.stages.teachers import teacher_dir

    tdir = os.path.abspath(cfg.run.out_dir) + "-teachers"
    return {f"teachers.models.{i}.checkpoint": os.path.join(teacher_dir(tdir, t.name), "best.safetensors")
            for i, t in enumerate(cfg.teachers.models)}


def on_regime_logits(cfg) -> dict:
    """Overrides that train a student on the regime's logits cache (K = its epochs) and teachers."""
    return {**on_regime_teachers(cfg), "cache.uri": os.path.join(os.path.abspath(cfg.run.out_dir), "cache-logits"),
            "cache.views": cfg.distill.optim.epochs, "cache.layers": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="default: twice the regime's distill.optim.epochs")
    ap.add_argument("--from-epochs", type=int, default=None,
                    help="probe another length: train CE and KD at N epochs too (on the regime's cache) and record "
                         "the paired gain from N to --epochs (default 2N); default: the regime's own students")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["ce", "kd"], choices=list(VARIANTS),
                    help="rows of bench/accuracy.py to probe (CE and KD are the convergence target's)")
    ap.add_argument("--regime", default="bench/results/fm10/accuracy.json",
                    help="the regime's result: which teacher was best and smallest")
    ap.add_argument("--out", default="bench/results/fm10/plateau.json")
    ap.add_argument("--one-cache", action="store_true",
                    help="every row reads the regime's feature cache, as bench/accuracy.py --one-cache (make bench)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    regime = json.load(open(args.regime))  # the teachers its rows' placeholders resolved to
    smallest = min(regime["teachers"], key=lambda t: regime["teachers"][t]["params"])
    args.epochs = args.epochs or 2 * (args.from_epochs or cfg.distill.optim.epochs)
    lengths = [args.epochs] + ([args.from_epochs] if args.from_epochs else [])
    methods = sorted(args.methods, key=lambda m: m not in SLOW)  # the slow ones first: none runs alone at the end
    runs = [(e, m, s) for m in methods for e in lengths for s in args.seeds]
    caches = {LOGITS: on_regime_logits(cfg), FEATURES: on_regime_teachers(cfg)}
    kind = {m: FEATURES if args.one_cache else VARIANTS[m][1] for m in methods}
    cfgs = [variant(cfg, {**caches[kind[m]], **row_changes(m, regime["best_teacher"], smallest),
                          "distill.optim.epochs": e, "distill.student.seed": s, "distill.name": f"plateau{e}-{m}-s{s}"},
                    "plateau probe") for e, m, s in runs]
    from raykd.pipeline.stages.professor import run_professor

    for c in {kind[m]: c for (_, m, _), c in zip(runs, cfgs) if c.method.targets in ("refined", "both")}.values():
        run_professor(c)  # the regime's professor, reused (its fingerprint does not hold the student's epochs)
    recs = dict(zip(runs, run_students(cfgs, cfg.run.parallel)))
    res = {"command": " ".join(["python bench/plateau.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "regime_epochs": cfg.distill.optim.epochs,
           "regime_batch_size": cfg.distill.optim.batch_size, "regime_lr": cfg.distill.optim.lr,
           "seeds": args.seeds, "methods": {}}
    for m in args.methods:
        rs = [recs[args.epochs, m, s] for s in args.seeds]
        res["methods"][m] = {**_row(rs, args.seeds),
                             "val_curve": [round(statistics.mean(c), 5) for c in zip(*(_curve(cfg, r) for r in rs))]}
        if "inference" in rs[0]:  # IMF: its exported inference model
            res["methods"][m]["inference"] = _row(rs, args.seeds, key=lambda r: r["inference"])
        if args.from_epochs:  # the paired gain from N epochs to args.epochs, seed by seed
            before = {s: recs[args.from_epochs, m, s]["test_acc"] for s in args.seeds}
            gain = paired(res["methods"][m], {"per_seed": before})
            res["methods"][m]["from"] = {"epochs": args.from_epochs, "per_seed": before,
                                         "test_acc_mean": round(statistics.mean(before.values()), 5),
                                         "gain_mean": round(gain["mean"], 5), "gain_ci95": round(gain["ci95"], 5)}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print({m: (r["test_acc_mean"], r["test_acc_std"], r.get("from", {}).get("gain_mean")) for m, r in res["methods"].items()},
          "->", args.out)


if __name__ == "__main__":
    main()
