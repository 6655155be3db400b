"""run.tracking: TensorBoard event files and MLflow runs, read back with their own readers."""

import os

import pytest
from conftest import digits_cfg


def test_teacher_and_student_are_tracked_in_tensorboard_and_mlflow(tmp_path):
    """Every epoch's metrics of a teacher and a student land in TensorBoard event files and in one MLflow
    run each (params = the resolved config); rerunning a finished job opens no second run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    extra = ["run.tracking=[tensorboard, mlflow]", "teachers.models=[{name: t, arch: cnn4, seed: 1}]", "cache.layers={}",
             "teachers.optim.epochs=3", "method.name=kd", "distill.teachers=online", "distill.optim.epochs=2"]
    cfg = digits_cfg(str(tmp_path), *extra)
    run_teachers(cfg)
    rec = run_distill(cfg)

    ea = EventAccumulator(os.path.join(tmp_path, "tensorboard", "teachers", "t")).Reload()
    assert [e.step for e in ea.Scalars("val_acc")] == [1, 2, 3] and "train_loss" in ea.Tags()["scalars"]
    ea = EventAccumulator(os.path.join(tmp_path, "tensorboard", "students", rec["name"])).Reload()
    assert [e.step for e in ea.Scalars("val_acc")] == [1, 2]
    assert ea.Scalars("val_acc")[-1].value == pytest.approx(rec["val_acc"], abs=1e-6)
    assert {"train_kd", "train_ce", "test_acc"} <= set(ea.Tags()["scalars"])

    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(tmp_path, "mlflow.db"))
    for stage, name, epochs in (("teachers", "t", 3), ("students", rec["name"], 2)):
        exp = client.get_experiment_by_name(f"raykd-{stage}")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.run_name == name and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == list(range(1, epochs + 1))
        assert run.data.params["method.name"] == "kd" and run.data.params["teachers.optim.epochs"] == "3"
    run_distill(digits_cfg(str(tmp_path), *extra))  # up to date: nothing trains, no second run
    exp = client.get_experiment_by_name("raykd-students")
    assert len(client.search_runs([exp.experiment_id])) == 1
