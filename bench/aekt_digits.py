"""AEKT's options on digits at the benchmarks' peak learning rate (0.2), chosen on validation accuracy: the regime
of tests/test_aekt_stability.py. A cnn8 teacher trained on every digits training image (8 epochs), cnn4 students
on a seeded 300 of them (the benchmarks' teachers-on-all-data shape: the teacher knows more than the students'
data), 40 epochs at batch 64, the teacher online, in this process (no Ray); seeds 7, 8 and 9 (not the
benchmarks'). Rows: CE, KD (w_ce = 1), DKD and AEKT over beta (NCKD's weight), AEKT over its serialization
layer's lr factor. Only validation accuracy is read: the test split is the stability test's, not this choice's.

    python bench/aekt_digits.py [--out bench/results/aekt/digits.txt]    # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd.pipeline.core.config import load_config  # noqa: E402
from raykd.pipeline.core.errors import StageFailed  # noqa: E402
from raykd.pipeline.stages.distill import student_dir  # noqa: E402
from raykd.pipeline.stages.students import run_distill  # noqa: E402
from raykd.pipeline.stages.teachers import run_teachers, teacher_dir  # noqa: E402

SEEDS = (7, 8, 9)
ROWS = [("ce", ["method.name=ce"]), ("kd_wce1", ["method.name=kd", "method.kd.w_ce=1.0"])]
ROWS += [(f"dkd_b{b}", ["method.name=dkd", "method.dkd.warmup=5", f"method.dkd.beta={b}"]) for b in (1, 2, 4, 8)]
ROWS += [(f"aekt_b{b}_f{f}", ["method.name=aekt", "method.aekt.warmup=5", f"method.aekt.beta={b}",
                              f"method.aekt.lr_factor={f}"]) for b in (1, 2, 4, 8) for f in (1.0, 0.1, 0.01)]


def regime(out: str) -> list[str]:
    """The students' overrides: the teacher trained on all training images first (once per out dir)."""
    tcfg = [f"run.out_dir={out}/teacher", "run.device=cpu", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
            "teachers.optim.epochs=8"]
    run_teachers(load_config(None, tcfg))
    ckpt = os.path.join(teacher_dir(os.path.abspath(f"{out}/teacher"), "t"), "best.safetensors")
    base = [f"run.out_dir={out}", "run.device=cpu", f"teachers.models=[{{name: t, arch: cnn8, seed: 1, checkpoint: {ckpt}}}]",
            "data.train_subset=300", "distill.teachers=online", "distill.student.arch=cnn4", "distill.optim.epochs=40",
            "distill.optim.lr=0.2", "distill.optim.batch_size=64"]
    run_teachers(load_config(None, base))  # the checkpoint's record in the students' out dir
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/aekt/digits.txt")
    ap.add_argument("--runs", default="runs/aekt-digits")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    t0 = time.time()
    base = regime(args.runs)
    lines = [f"# python bench/aekt_digits.py --out {args.out}   ({time.strftime('%Y-%m-%d')}, 2 CPU cores)",
             "# last-epoch val accuracy (digits validation split, 144 images) per seed 7 / 8 / 9, its mean; "
             "maxD = the largest epoch mean of ||D||_F"]
    means = {}
    for name, extra in ROWS:
        vals, ds = [], []
        for seed in SEEDS:
            cfg = load_config(None, [*base, *extra, f"distill.name={name}-s{seed}", f"distill.student.seed={seed}"])
            try:
                r = run_distill(cfg)
            except StageFailed:
                vals = None
                break
            ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
            vals.append(r["val_acc"])
            ds.append(max(m.get("train_D_norm", 0) for m in ms))
        if vals is None:
            lines.append(f"{name:16s} diverged (seed {seed})")
        else:
            means[name] = statistics.mean(vals)
            lines.append(f"{name:16s} val {' '.join(f'{v:.4f}' for v in vals)}  mean {means[name]:.4f}   maxD {max(ds):.3g}")
        print(lines[-1], flush=True)
    aekt = {k: v for k, v in means.items() if k.startswith("aekt")}
    dkd = {k: v for k, v in means.items() if k.startswith("dkd")}
    lines.append(f"# best on val: AEKT {max(aekt, key=aekt.get)}, DKD {max(dkd, key=dkd.get)}; "
                 f"{(time.time() - t0) / 60:.1f} min")
    print(lines[-1])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
