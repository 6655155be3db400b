"""Distillation on Ray Train from the shared digits cache: outputs, cached = online, failures and resume."""

import json
import os

import pytest
import torch
from conftest import TEACHERS, digits_cfg

from raykd.pipeline.cache import CacheError
from raykd.pipeline.core.errors import StageFailed
from raykd.pipeline.harness.training import evaluate
from raykd.pipeline.models.checkpoints import load_state_dict
from raykd.pipeline.models.zoo import build_model
from raykd.pipeline.stages.distill import student_dir, student_record
from raykd.pipeline.stages.students import run_distill

pytestmark = pytest.mark.timeout(400)


def _metrics(cfg):
    return [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]


def test_kd_from_the_cache_end_to_end(built, digits, capsys):
    cfg0, _ = built
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=3",
                     "distill.optim.lr=0.1")
    rec = run_distill(cfg)
    sdir = student_dir(cfg)
    assert rec["name"] == "kd-cnn4-s0" and rec["teachers"] == ["a", "b"] and rec["mode"] == "cache"
    ms = _metrics(cfg)
    assert [m["epoch"] for m in ms] == [1, 2, 3] and [m["view"] for m in ms] == [0, 1, 0]
    assert all({"train_loss", "train_ce", "train_kd", "train_acc", "val_acc", "test_acc", "samples_per_s"} <= set(m)
               for m in ms)
    assert all(m["samples"] == len(digits.train) for m in ms)
    assert ms[-1]["train_loss"] < ms[0]["train_loss"]
    assert rec["test_acc"] > 0.3  # 3 epochs of a 1.7k-parameter CNN: far above chance (0.1)
    header = open(os.path.join(sdir, "metrics.csv")).readline().strip().split(",")
    assert {"epoch", "train_kd", "val_acc"} <= set(header)
    assert "method:\n  name: kd" in open(os.path.join(sdir, "config.resolved.yaml")).read()
    # the saved student reproduces the recorded test accuracy; .pt and .safetensors hold the same weights
    student = build_model("cnn4", 10, 1)
    student.load_state_dict(load_state_dict(os.path.join(sdir, "student.safetensors")))
    acc, _ = evaluate(student, torch.from_numpy(digits.test.images), torch.from_numpy(digits.test.labels),
                      digits.mean, digits.std, "cpu")
    assert acc == pytest.approx(rec["test_acc"], abs=1e-9)
    pt = torch.load(os.path.join(sdir, "student.pt"), weights_only=True)
    assert all(torch.equal(pt[k], v) for k, v in student.state_dict().items())
    # the same config again: reused, not retrained
    capsys.readouterr()
    assert run_distill(cfg) == student_record(sdir).read()
    assert "up to date" in capsys.readouterr().out
    # the test split only after the last epoch: the same training, the same final accuracy
    last = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=3",
                      "distill.optim.lr=0.1", "distill.test_every=0", "distill.name=kd-test-last")
    rl, ml = run_distill(last), _metrics(last)
    assert ["test_acc" in m for m in ml] == [False, False, True] and all("val_acc" in m for m in ml)
    assert rl["test_acc"] == pytest.approx(rec["test_acc"], abs=1e-9)
    assert [m["train_loss"] for m in ml] == pytest.approx([m["train_loss"] for m in ms], rel=1e-6)


def test_cached_and_online_losses_agree(built, tmp_path):
    """Same seed, same views, one full-split batch per step (batch order cannot differ): the first steps'
    losses of cached and online training agree within the fp16 rounding of the cached logits."""
    cfg0, _ = built
    common = ["method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=3", "distill.optim.batch_size=2048",
              "distill.shuffle_buffer=0"]
    cached = digits_cfg(cfg0.run.out_dir, *common, "distill.name=agree-cached")
    online = digits_cfg(cfg0.run.out_dir, *common, "distill.name=agree-online", "distill.teachers=online")
    rc, ro = run_distill(cached), run_distill(online)
    assert rc["mode"] == "cache" and ro["mode"] == "online"
    mc, mo = _metrics(cached), _metrics(online)
    for a, b in zip(mc, mo):
        for k in ("train_loss", "train_ce", "train_kd"):
            assert a[k] == pytest.approx(b[k], rel=5e-4), (a["epoch"], k)
    assert mc[0]["train_kd"] > 0.1  # the teachers' targets are really in the loss


@pytest.mark.parametrize("where, workers, kind", [("in_process", 1, "raise"), ("task", 1, "exit"), ("train", 2, "raise")])
def test_failed_worker_resumes_from_its_checkpoint(built, tmp_path, monkeypatch, where, workers, kind):
    """A lone job in this process is run again after its error; a job in a Ray task whose process dies is
    started again; under Ray Train (views streamed to each worker's shard) the worker group restarts.
    Each goes on from the newest checkpoint."""
    cfg0, _ = built
    marker = tmp_path / "fault"
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 2, "step": 3, "marker": str(marker), "kind": kind}))
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=dkd", "distill.student.arch=cnn4", "distill.optim.epochs=2",
                     "distill.workers.max_failures=1", f"distill.workers.num_workers={workers}",
                     f"run.in_process={where == 'in_process'}", f"distill.name=resume-{where}",
                     f"distill.in_memory={where != 'train'}")  # Ray Train's workers stream their shards
    rec = run_distill(cfg)
    assert marker.exists()  # the fault did happen
    ms = _metrics(cfg)
    assert [m["epoch"] for m in ms] == [1, 2] and rec["epochs"] == 2
    assert ms[0]["resumed_after"] is None and ms[1]["resumed_after"] == 1
    assert all(m["workers"] == workers for m in ms)


def test_interrupted_run_resumes_when_rerun(built, tmp_path, monkeypatch):
    """A run that dies (no failures allowed) keeps its checkpoints; the same command again resumes it."""
    cfg0, _ = built
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 3, "step": 0, "marker": str(tmp_path / "f"), "kind": "exit"}))
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=ce", "distill.student.arch=cnn4", "distill.optim.epochs=3",
                     "distill.workers.max_failures=0", "run.in_process=false",  # the job's process dies, not pytest
                     "distill.test_every=2")
    with pytest.raises(StageFailed, match="rerun the same command to resume"):
        run_distill(cfg)
    assert student_record(student_dir(cfg)).read() is None
    monkeypatch.delenv("RAYKD_FAULT")
    run_distill(cfg)
    ms = _metrics(cfg)
    assert [m["epoch"] for m in ms] == [1, 2, 3] and ms[2]["resumed_after"] == 2  # epoch 2's checkpoint
    assert ["test_acc" in m for m in ms] == [False, True, True]  # every 2nd epoch and the last, across the resume


def test_corrupt_checkpoint_is_named_and_kept(built, tmp_path, monkeypatch):
    """The checkpoint an interrupted run resumes from is damaged: the rerun stops with an error naming
    it and deletes nothing; with the run's folder removed, as the message says, the next rerun starts over."""
    import glob

    cfg0, _ = built
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 3, "step": 0, "marker": str(tmp_path / "f"), "kind": "exit"}))
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=ce", "distill.student.arch=cnn4", "distill.optim.epochs=3",
                     "distill.workers.max_failures=0", "distill.name=corrupt-ckpt", "run.in_process=false")
    with pytest.raises(StageFailed):
        run_distill(cfg)
    monkeypatch.delenv("RAYKD_FAULT")
    runs = glob.glob(os.path.join(cfg.run.out_dir, "ray_train", "student-corrupt-ckpt-*"))
    assert len(runs) == 1, runs
    with open(os.path.join(runs[0], "latest.json")) as f:  # the checkpoint the rerun resumes from
        newest = os.path.join(runs[0], json.load(f)["checkpoint"])
    assert newest.endswith("checkpoint_000002"), "epoch 2's checkpoint was not written before the worker died"
    state = os.path.join(newest, "train_state.pt")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    before = sorted(glob.glob(os.path.join(os.path.dirname(newest), "**"), recursive=True))
    run_dir = os.path.dirname(newest)
    with pytest.raises(StageFailed, match=rf"checkpoint .*checkpoint_000002 is unreadable .*it is kept.*remove {run_dir}"):
        run_distill(cfg)
    assert os.path.getsize(state) > 0 and all(os.path.exists(p) for p in before)  # nothing deleted
    assert student_record(student_dir(cfg)).read() is None
    import shutil

    shutil.rmtree(run_dir)
    rec = run_distill(cfg)
    assert rec["epochs"] == 3 and [m["resumed_after"] for m in _metrics(cfg)] == [None, None, None]


def test_a_diverging_run_stops_with_a_message(built):
    """A loss that is no longer finite stops the run at that step, naming it (not epochs of nan weights)."""
    cfg0, _ = built
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=2",
                     "distill.optim.lr=1e12", "distill.optim.schedule=constant", "distill.workers.max_failures=0",
                     "distill.name=diverges")
    with pytest.raises(StageFailed, match=r"the loss became (nan|inf) at epoch 1, step \d+ \(ce .*set distill.optim.grad_clip"):
        run_distill(cfg)
    assert student_record(student_dir(cfg)).read() is None


def test_missing_cache_and_unknown_teachers_are_named(built, tmp_path):
    cfg0, _ = built
    with pytest.raises(CacheError, match="not a cache"):
        run_distill(digits_cfg(cfg0.run.out_dir, f"cache.uri={tmp_path / 'none'}"))
    # a teacher that is configured but not in the cache
    cfg = digits_cfg(cfg0.run.out_dir, "teachers.models=[{name: a, arch: cnn4, seed: 1}, "
                     "{name: b, arch: resnet8, seed: 2}, {name: c, arch: cnn8}]", "method.teachers=[c]")
    with pytest.raises(CacheError, match="no teacher 'c' in the cache"):
        run_distill(cfg)


def test_students_in_parallel_one_failing(built, tmp_path):
    """`raykd run`'s students run as concurrent Ray tasks; a failing one does not stop the other."""
    from raykd.pipeline.stages.students import run_students

    cfg0, _ = built
    good = digits_cfg(cfg0.run.out_dir, "method.name=ce", "distill.student.arch=cnn4", "distill.optim.epochs=1",
                      "distill.name=par-good")
    bad = digits_cfg(cfg0.run.out_dir, "method.name=kd", f"cache.uri={tmp_path / 'none'}", "distill.name=par-bad")
    with pytest.raises(StageFailed, match=r"par-bad: .*not a cache"):
        run_students([good, bad], parallel=2)
    assert student_record(student_dir(good)).read()["epochs"] == 1


def test_bf16_student_trains_under_autocast(tmp_path, monkeypatch):
    """optim.precision=bf16 on CPU: the student's forward runs in bfloat16 (torch.autocast), the loss in
    fp32, and it learns; fp32 keeps every fingerprint (the option is not serialised at its default);
    fp16 without CUDA is refused by name."""
    from raykd.pipeline.core.errors import ConfigError
    from raykd.pipeline.core.sections import OptimSection
    from raykd.pipeline.harness.training import Precision

    assert "precision" not in OptimSection().model_dump() and OptimSection(precision="bf16").model_dump()["precision"] == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Precision("fp16", "cpu")
    seen = []
    from raykd.pipeline.models import zoo as models

    real = models.SmallCNN.forward_stages

    def spy(self, x):
        logits, stages = real(self, x)
        seen.append(logits.dtype)
        return logits, stages

    monkeypatch.setattr(models.SmallCNN, "forward_stages", spy)
    cfg = digits_cfg(str(tmp_path), "method.name=ce", "distill.teachers=online", "distill.optim.epochs=4",
                     "distill.optim.precision=bf16", "distill.student.arch=cnn8")
    rec = run_distill(cfg)
    assert torch.bfloat16 in seen and rec["test_acc"] > 0.5


def test_run_trains_its_student_while_the_cache_is_built(built, tmp_path, cli, capsys):
    """`raykd run` on a cache it has still to build: the student starts on the views committed so far and
    is the student `raykd distill` trains on the finished cache (same fingerprint: reused)."""
    cfg0, _ = built
    uri = tmp_path / "chain_cache"
    argv = [f"run.out_dir={cfg0.run.out_dir}", "run.device=cpu", TEACHERS, "teachers.optim.epochs=2", "cache.views=3",
            "cache.layers={b: [stage2, stage3]}", f"cache.uri={uri}", "method.name=kd", "distill.student.arch=cnn4",
            "distill.optim.epochs=3", "distill.name=chained"]
    code, out, err = cli("run", *argv)
    assert code == 0, err[-2000:]
    assert "chained" in out.split("\n\n")[-1]  # the results table
    m = json.load(open(uri / "manifest.json"))
    assert m["views"] == 3 and m["rows"] == 3 * 1294
    capsys.readouterr()
    rec = run_distill(digits_cfg(cfg0.run.out_dir, *argv[4:]))
    assert "up to date" in capsys.readouterr().out and rec["name"] == "chained"
