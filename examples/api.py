"""raykd from Python: teachers -> a student with the teachers online -> the student as a module.

    python examples/api.py [key=value ...]

Runs on the embedded digits data without Ray (a lone job trains in this process); the same calls with a
cache (`raykd.cache(cfg)`, `distill.teachers: cache`) use Ray. A test runs this file.
"""

import logging
import sys

import torch

import raykd

logging.getLogger("raykd").setLevel(logging.WARNING)  # quiet: only the summary below is printed

cfg = raykd.load_config(None, ["run.out_dir=runs/example-api", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
                               "teachers.optim.epochs=4", "cache.layers={}", "distill.teachers=online",
                               "distill.optim.epochs=4", *sys.argv[1:]])
(teacher,) = raykd.teachers(cfg)
kd = raykd.distill(raykd.with_changes(cfg, {"method.name": "kd"}))
student = raykd.load_student(cfg, kd["name"])
with torch.no_grad():
    logits = student(torch.zeros(1, 1, 8, 8))
print(f"teacher {teacher['test_acc']:.3f}  KD student {kd['test_acc']:.3f}  logits {tuple(logits.shape)}")
