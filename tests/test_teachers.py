"""Teacher training on Ray Train (one session-wide Ray), record files, reuse, loading and the accuracy gate."""

import json
import os

import pytest
import torch

from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import RaykdError
from raykd.pipeline.harness.training import evaluate
from raykd.pipeline.models.checkpoints import save_state_dict
from raykd.pipeline.models.zoo import build_model
from raykd.pipeline.stages.teachers import load_teacher, run_teachers, teacher_dir

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teachers"))
    cfg = load_config(None, [f"run.out_dir={out}", "run.device=cpu", "teachers.models=[{name: t, arch: cnn8, seed: 1}]",
                             "teachers.optim.epochs=8", "teachers.min_val_acc=0.8"])
    return cfg, run_teachers(cfg)


def test_teacher_reaches_stated_accuracy(trained, digits):
    cfg, (rec,) = trained
    # a 6k-parameter CNN, 8 epochs on ~1.3k digits: stated bar 90 % test accuracy
    assert rec["test_acc"] >= 0.90 and rec["val_acc"] >= 0.90
    assert rec["gate"]["passed"] and rec["epochs"] == 8
    tdir = teacher_dir(cfg.run.out_dir, "t")
    lines = [json.loads(x) for x in open(os.path.join(tdir, "metrics.jsonl"))]
    assert [m["epoch"] for m in lines] == list(range(1, 9))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # the test split is evaluated once, after the last epoch, on the best epoch's weights: nothing before it sees test
    assert not any("test_acc" in m or "best_test_acc" in m for m in lines[:-1])
    assert lines[-1]["best_test_acc"] == rec["test_acc"] and "test_acc" not in lines[-1]
    assert os.path.isfile(os.path.join(cfg.run.out_dir, "teachers", "config.resolved.yaml"))
    # the saved best checkpoint reproduces the recorded accuracy on the test split
    model, _ = load_teacher(cfg.run.out_dir, "t")
    acc, _ = evaluate(model, torch.from_numpy(digits.test.images), torch.from_numpy(digits.test.labels),
                      digits.mean, digits.std, "cpu")
    assert acc == pytest.approx(rec["test_acc"], abs=1e-9)


def test_rerun_reuses_without_training(trained, capsys):
    cfg, (rec,) = trained
    (again,) = run_teachers(cfg)
    assert "up to date" in capsys.readouterr().out
    assert again["best"]["sha256"] == rec["best"]["sha256"] and again["wall_time_s"] == rec["wall_time_s"]


def test_given_checkpoint_is_evaluated_not_trained(trained, tmp_path):
    cfg, (rec,) = trained
    ckpt = os.path.join(teacher_dir(cfg.run.out_dir, "t"), "best.safetensors")
    cfg2 = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu",
                              f"teachers.models=[{{name: given, arch: cnn8, checkpoint: {ckpt}}}]"])
    (r,) = run_teachers(cfg2)
    assert r["source"] == ckpt and "last" not in r
    assert r["test_acc"] == pytest.approx(rec["test_acc"]) and r["val_acc"] == pytest.approx(rec["val_acc"])
    assert not os.path.exists(os.path.join(tmp_path, "ray_train"))


def test_gate_refuses_weak_teacher(ray_session, tmp_path):
    # an untrained network (about chance on 10 classes) against a 50 % gate
    torch.manual_seed(0)
    ckpt = str(tmp_path / "untrained.safetensors")
    save_state_dict(build_model("cnn4", 10, 1).state_dict(), ckpt)
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.min_val_acc=0.5",
                             f"teachers.models=[{{name: weak, arch: cnn4, checkpoint: {ckpt}}}]"])
    (r,) = run_teachers(cfg)
    assert r["val_acc"] < 0.5 and not r["gate"]["passed"]
    with pytest.raises(RaykdError, match="below the accuracy gate"):
        load_teacher(str(tmp_path), "weak")
    load_teacher(str(tmp_path), "weak", for_cache=False)  # still loadable for evaluation


def test_two_workers_share_the_training_split(ray_session, tmp_path, digits):
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.workers.num_workers=2",
                             "teachers.workers.cpus_per_worker=0.5", "teachers.optim.epochs=2",
                             "teachers.models=[{name: ddp, arch: cnn4}]"])
    (rec,) = run_teachers(cfg)
    lines = [json.loads(x) for x in open(os.path.join(teacher_dir(str(tmp_path), "ddp"), "metrics.jsonl"))]
    assert [m["workers"] for m in lines] == [2, 2]
    # each worker got its own half: together one pass over the split (an equal split drops at most 1 row)
    assert all(len(digits.train) - 2 < m["samples"] <= len(digits.train) for m in lines)
    assert rec["epochs"] == 2
