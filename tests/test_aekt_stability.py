"""AEKT at the benchmarks' peak learning rate (0.2) on digits, in the regime of bench/aekt_digits.py (in this
process, the teacher online: no Ray): a cnn8 teacher on every training image, cnn4 students on 300 of them,
40 epochs. With beta = 1 (NCKD's weight, chosen there on validation: bench/results/aekt/digits.txt) and the
serialization layer at its own lr factor (0.01), AEKT stays finite and ends above CE in test accuracy for
each seed; at the student's lr (factor 1) the same student diverges."""

import json
import math
import os
import sys

import pytest

from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import StageFailed
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.students import run_distill

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from aekt_digits import regime  # noqa: E402  (bench/aekt_digits.py)


def test_aekt_at_lr_0_2_stays_finite_and_ends_above_ce(tmp_path):
    base = regime(str(tmp_path))
    aekt = ["method.name=aekt", "method.aekt.warmup=5", "method.aekt.beta=1"]
    for seed in (7, 8):
        ce = run_distill(load_config(None, [*base, "method.name=ce", f"distill.name=ce-{seed}",
                                            f"distill.student.seed={seed}"]))
        cfg = load_config(None, [*base, *aekt, f"distill.name=aekt-{seed}", f"distill.student.seed={seed}"])
        rec = run_distill(cfg)
        ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
        assert all(math.isfinite(m[k]) for m in ms for k in ("train_loss", "train_D_norm", "train_w_peak"))
        assert max(m["train_D_norm"] for m in ms) < 10
        assert rec["test_acc"] > ce["test_acc"] + 0.01, (seed, rec["test_acc"], ce["test_acc"])
    with pytest.raises(StageFailed, match="the loss became"):  # the same student, the layer at the student's lr
        run_distill(load_config(None, [*base, *aekt, "distill.name=aekt-f1", "distill.student.seed=7",
                                       "method.aekt.lr_factor=1"]))
