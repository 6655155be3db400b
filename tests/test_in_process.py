"""A lone one-worker job on this machine runs in the command's own process: teachers and an online
student end to end without starting Ray (the fast tier runs this)."""

import json
import os

import pytest

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


def test_the_stage_driver_keeps_each_jobs_outcome_and_runs_chains(monkeypatch):
    """StageDriver over the real JobRunner (in this process): a job that fails and a finish that raises are
    kept by key, said at once, and do not stop the others; a finish may queue the next job of a chain,
    which runs in the same run(); `one` raises a lone job's failure."""
    from types import SimpleNamespace

    from raykd.pipeline.core.errors import StageFailed
    from raykd.pipeline.harness import runner
    from raykd.pipeline.harness.driver import StageDriver
    from raykd.pipeline.harness.job import Job, JobResult
    from raykd.pipeline.harness.placement import Placement

    def local(job, tune=False):  # the job itself, instead of train_loop
        if job.name == "broken":
            raise ValueError("a bug in the task")
        return JobResult({"name": job.name}, [{"epoch": 1}])

    monkeypatch.setattr(runner, "run_local", local)
    workers = SimpleNamespace(num_workers=1, max_failures=0, cpus_per_worker=1, gpus_per_worker=0)
    place = Placement(cfg=None, workers=workers, parallel=2, inline=True, share=None, storage={})

    def job(name):
        return Job(kind="teacher", name=name, run_name=name, seed=0, epochs=1, workers=workers, storage={})

    said, started = [], []
    drive = StageDriver(place, failed=lambda key, e: said.append((key, type(e).__name__)))

    def finish(res, seconds):
        assert seconds >= 0
        if res.state["name"] == "first":  # a chain: the next job runs in this same run()
            drive.submit("second", job("second"), finish)
        if res.state["name"] == "unlucky":
            raise OSError("no space left to write its outputs")
        return res.state["name"]

    for name in ("first", "broken", "unlucky"):
        drive.submit(name, job(name), finish, start=lambda name=name: started.append(name))
    assert drive.run() == {"first": "first", "second": "second"}
    assert started == ["first", "broken", "unlucky"]
    assert said == [("broken", "StageFailed"), ("unlucky", "OSError")]
    assert "teacher training of broken failed: ValueError: a bug in the task" in str(drive.errors["broken"])
    assert str(drive.errors["unlucky"]) == "no space left to write its outputs"

    assert StageDriver(place).one(job("alone")).state == {"name": "alone"}
    with pytest.raises(StageFailed, match="ValueError: a bug in the task"):
        StageDriver(place).one(job("broken"))
