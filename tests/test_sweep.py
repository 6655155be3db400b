"""`raykd sweep`: Ray Tune trials over the shared digits cache; search-space errors before any trial."""

import csv
import glob
import json
import os

import pytest
from conftest import digits_cfg

from raykd.pipeline.cli import main
from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.stages.students import run_distill
from raykd.pipeline.stages.sweep import run_sweep

pytestmark = pytest.mark.timeout(600)

SPACE = "sweep.space={distill.optim.lr: {grid: [0.05, 0.2]}, method.kd.temperature: {choice: [2.0, 4.0]}}"


def test_four_trial_sweep_reads_the_cache_only_and_its_best_config_reruns(built):
    cfg0, _ = built
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=2",
                     "distill.workers.torch_threads=1", SPACE, "sweep.num_samples=2", "sweep.name=t4")
    s = run_sweep(cfg)
    rows = s["rows"]
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert sorted(r["distill.optim.lr"] for r in rows) == [0.05, 0.05, 0.2, 0.2]  # the grid, crossed with 2 samples
    assert [r["val_acc"] for r in rows] == sorted((r["val_acc"] for r in rows), reverse=True)
    assert all(r["epochs"] == 2 and r["test_acc"] is not None for r in rows)
    # no teacher was loaded in any trial, in any epoch: every epoch's record says so
    for r in rows:
        sdir = os.path.join(cfg.run.out_dir, "students", r["student"])
        assert r["student"] == f"t4-{r['trial']}"
        trial_cfg = load_config(os.path.join(sdir, "config.resolved.yaml"))
        ms = [json.loads(x) for x in open(os.path.join(sdir, "metrics.jsonl"))]
        assert [m["teachers_loaded"] for m in ms] == [0, 0]
        assert trial_cfg.method.kd.temperature == r["method.kd.temperature"]
    out = s["dir"]
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["trial"] for r in rows] and "test_acc" in table[0]
    assert open(os.path.join(out, "results.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the best config runs as is with `raykd distill` and reproduces the best trial's val accuracy
    best = load_config(os.path.join(out, "best.yaml"))
    assert best.distill.optim.lr == rows[0]["distill.optim.lr"] and best.method.kd.temperature == rows[0]["method.kd.temperature"]
    assert best.sweep.space == {} and best.distill.name is None
    rec = run_distill(best)
    assert rec["val_acc"] == pytest.approx(rows[0]["val_acc"], abs=1e-9)
    # the same command again restores the finished sweep from Tune's experiment state: no trial retrains
    stamps = {r["trial"]: os.path.getmtime(os.path.join(cfg.run.out_dir, "students", r["student"], "metrics.jsonl"))
              for r in rows}
    again = run_sweep(cfg)
    assert [(r["trial"], r["val_acc"]) for r in again["rows"]] == [(r["trial"], r["val_acc"]) for r in rows]
    assert stamps == {r["trial"]: os.path.getmtime(os.path.join(cfg.run.out_dir, "students", r["student"],
                                                                "metrics.jsonl")) for r in rows}


@pytest.mark.parametrize("space, msg", [
    ("{distill.optim.lrr: {grid: [0.1]}}", "distill.optim.lrr"),
    ("{distill.optim.lr: {gaussian: [0, 1]}}", "not one distribution"),
    ("{distill.optim.lr: {loguniform: [0, 1]}}", "low bound must be > 0"),
    ("{distill.optim.lr: {uniform: [1, 0.1]}}", "low < high"),
    ("{method.name: {choice: [kd, nosuch]}}", "nosuch"),
])
def test_search_space_errors_before_any_trial(tmp_path, capsys, space, msg):
    """No Ray, no cache, no trial: the space is checked first; the CLI exits 2 with the culprit named."""
    cfg = digits_cfg(str(tmp_path), f"sweep.space={space}")
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        run_sweep(cfg)
    code = main(["sweep", f"run.out_dir={tmp_path}", f"sweep.space={space}"])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "sweeps")


def test_optuna_sweep_samples_the_space_from_the_cache(built):
    """sweep.search=optuna: Ray Tune's OptunaSearch (TPE, seeded) behind a concurrency limiter proposes each
    trial's values inside the space; every trial reads the cache, finishes and is tracked as its own MLflow
    run; the space's grid is refused."""
    cfg0, _ = built
    space = "sweep.space={distill.optim.lr: {loguniform: [0.01, 0.3]}, method.kd.temperature: {choice: [2.0, 4.0]}}"
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=1",
                     "distill.workers.torch_threads=1", space, "sweep.search=optuna", "sweep.num_samples=2",
                     "sweep.name=opt3", "sweep.max_concurrent=2", "run.tracking=[mlflow]",
                     f"run.mlflow_uri=sqlite:///{cfg0.run.out_dir}/opt3.db")
    rows = run_sweep(cfg)["rows"]
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    # no attempt failed either (a retry would hide two trials racing to create the tracking store)
    assert not glob.glob(os.path.join(cfg.run.out_dir, "sweeps", "opt3", "tune", "*", "error.txt"))
    assert all(0.01 <= r["distill.optim.lr"] <= 0.3 and r["method.kd.temperature"] in (2.0, 4.0) for r in rows)
    assert len({r["distill.optim.lr"] for r in rows}) == 2  # sampled, not a grid
    for r in rows:
        ms = [json.loads(x) for x in open(os.path.join(cfg.run.out_dir, "students", r["student"], "metrics.jsonl"))]
        assert [m["teachers_loaded"] for m in ms] == [0]
    # tracked: one MLflow run per trial, named after its student, with the trial's own values as params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cfg0.run.out_dir}/opt3.db")
    runs = {x.info.run_name: x for x in client.search_runs([client.get_experiment_by_name("raykd-students").experiment_id])}
    assert set(runs) == {r["student"] for r in rows}
    for r in rows:
        assert float(runs[r["student"]].data.params["distill.optim.lr"]) == pytest.approx(r["distill.optim.lr"])
        assert runs[r["student"]].data.metrics["val_acc"] == pytest.approx(r["val_acc"])
    from raykd.pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="optuna samples its dimensions; use choice instead of grid"):
        run_sweep(digits_cfg(cfg0.run.out_dir, SPACE, "sweep.search=optuna"))
