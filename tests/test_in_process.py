"""A lone one-worker job on this machine runs in the command's own process: teachers and an online
student end to end without starting Ray (the fast tier runs this)."""

import json
import os

from raykd.pipeline.core.config import load_config
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.students import run_distill
from raykd.pipeline.stages.teachers import run_teachers


def test_a_lone_job_trains_in_this_process_without_ray(tmp_path, capsys):
    import ray

    ray_before = ray.is_initialized()
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
                             "teachers.optim.epochs=6", "method.name=kd", "distill.teachers=online",
                             "distill.student.arch=cnn4", "distill.optim.epochs=4", "distill.optim.lr=0.1"])
    (teacher,) = run_teachers(cfg)
    rec = run_distill(cfg)
    if not ray_before:  # in `make test` another test may have started the session's Ray already
        assert not ray.is_initialized()
    assert teacher["epochs"] == 6 and teacher["test_acc"] > 0.8 and rec["epochs"] == 4 and rec["mode"] == "online"
    ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
    assert [m["teachers_loaded"] for m in ms] == [1] * 4 and ms[-1]["train_loss"] < ms[0]["train_loss"]
    assert rec["test_acc"] > 0.3  # 4 epochs of a 1.7k-parameter CNN on digits, far above chance (0.1)
    out = capsys.readouterr().out  # the jobs' epoch lines reach the console directly
    assert "[teacher t] epoch 6/6" in out and f"[distill {rec['name']}] epoch 4/4" in out
    # each epoch checkpointed where a rerun resumes
    runs = os.listdir(os.path.join(tmp_path, "ray_train"))
    student_run = next(r for r in runs if r.startswith(f"student-{rec['name']}-"))
    latest = json.load(open(os.path.join(tmp_path, "ray_train", student_run, "latest.json")))
    assert latest == {"checkpoint": "checkpoint_000004", "epoch": 4}
    assert set(rec["profile"]) >= {"data_s", "job_start_s", "load_s", "train_s", "eval_s", "report_s"}
