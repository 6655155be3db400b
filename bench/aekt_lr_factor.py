"""AEKT's serialization-layer lr factor and `normalize`, chosen on validation accuracy: digits, a cnn8 teacher
(8 epochs), cnn4 students 10 epochs at the benchmark's peak lr 0.2, batch 64, the teacher online, in this
process (no Ray); seeds 7 and 8 (not the benchmark's). CE and KD with w_ce = 1 beside them.

    python bench/aekt_lr_factor.py [OUT_DIR]    # ~5 min on 2 cores; results: bench/results/aekt/lr_factor.txt
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd.pipeline.core.config import load_config  # noqa: E402
from raykd.pipeline.core.errors import StageFailed  # noqa: E402
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.students import run_distill  # noqa: E402
from raykd.pipeline.stages.teachers import run_teachers  # noqa: E402

ROWS = [("ce", ["method.name=ce"]), ("kd_wce1", ["method.name=kd", "method.kd.w_ce=1.0"])] + [
    (f"aekt_f{f}_n{n}", ["method.name=aekt", "method.aekt.warmup=2", f"method.aekt.lr_factor={f}",
                         f"method.aekt.normalize={n}"]) for f in (1.0, 0.1, 0.01) for n in ("true", "false")]


def main() -> None:
    logging.disable(logging.INFO)
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/aekt-lr-factor"
    base = [f"run.out_dir={out}", "run.device=cpu", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
            "teachers.optim.epochs=8", "distill.teachers=online", "distill.student.arch=cnn4",
            "distill.optim.epochs=10", "distill.optim.lr=0.2", "distill.optim.batch_size=64"]
    run_teachers(load_config(None, base))
    for seed in (7, 8):
        for name, extra in ROWS:
            cfg = load_config(None, [*base, *extra, f"distill.name={name}-s{seed}", f"distill.student.seed={seed}"])
            try:
                r = run_distill(cfg)
            except StageFailed:
                print(f"RESULT seed {seed} {name}: diverged", flush=True)
                continue
            ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
            d = max(m.get("train_D_norm", 0) for m in ms)
            print(f"RESULT seed {seed} {name}: val {r['val_acc']:.4f} maxD {d:.3g}", flush=True)


if __name__ == "__main__":
    main()
