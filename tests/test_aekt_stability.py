"""AEKT at the benchmark regime's peak learning rate (0.2) on digits (in this process, the teacher online:
no Ray): with the serialization layer at its own lr factor (0.01) it stays finite and learns; at the
student's lr (factor 1) the same student diverges. Not asserted, because it does not hold on digits: that
AEKT ends above CE (with `normalize` off, the default, seeds 7 and 8 end level with CE and 7.6 points
below it on validation: bench/results/aekt/lr_factor.txt). Digits is no regime for it: one 10-class
teacher above 90 %, and KD itself ends level with CE there; on the 100-class benchmark AEKT is 8.4
points above CE (docs/benchmarks.md)."""

import json
import math
import os

import pytest

from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import StageFailed
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.students import run_distill
from raykd.pipeline.stages.teachers import run_teachers


def test_aekt_at_lr_0_2_stays_finite_with_its_own_lr_factor(tmp_path):
    base = [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
            "teachers.optim.epochs=8", "distill.teachers=online", "distill.student.arch=cnn4",
            "distill.optim.epochs=10", "distill.optim.lr=0.2", "distill.optim.batch_size=64"]
    (teacher,) = run_teachers(load_config(None, base))
    assert teacher["test_acc"] > 0.9
    aekt = ["method.name=aekt", "distill.name=aekt", "method.aekt.warmup=2", "distill.student.seed=7"]
    rec = run_distill(load_config(None, aekt_cfg := [*base, *aekt]))
    cfg = load_config(None, aekt_cfg)
    ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
    assert all(math.isfinite(m["train_loss"]) for m in ms)
    assert all(math.isfinite(m["train_D_norm"]) and math.isfinite(m["train_w_peak"]) for m in ms)
    assert max(m["train_D_norm"] for m in ms) < 10 and rec["val_acc"] > 0.8
    with pytest.raises(StageFailed, match="the loss became"):  # the same student, the layer at the student's lr
        run_distill(load_config(None, [*base, *aekt, "distill.name=aekt-f1", "method.aekt.lr_factor=1"]))
