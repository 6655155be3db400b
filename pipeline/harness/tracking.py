"""Experiment tracking (`run.tracking: [tensorboard, mlflow]`, off by default).

Every training job — a teacher, the professor, a student, a sweep trial's student — logs from its rank-0
worker: its parameters (the resolved config, flattened) once, then every epoch's metrics at step = epoch.
TensorBoard: event files under <out_dir>/tensorboard/<stage>/<name>/ (torch's SummaryWriter). MLflow:
one run per job in the experiment `raykd-<stage>` of `run.mlflow_uri` (default an SQLite store,
<out_dir>/mlflow.db: MLflow 3 keeps its file store in maintenance), named after the job and tagged with its run name, so a job resumed from its
checkpoint logs on into the same run instead of opening another.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

from raykd.pipeline.core.errors import ConfigError


def tracking_spec(cfg, stage: str, name: str, run_name: str) -> dict | None:
    """What a job's worker needs to track it (plain values), or None when tracking is off."""
    if not cfg.run.tracking:
        return None
    out = os.path.abspath(cfg.run.out_dir)
    spec: dict = {"stage": stage, "name": name, "run_name": run_name, "params": _flat(cfg.model_dump(mode="json"))}
    if "tensorboard" in cfg.run.tracking:
        spec["tensorboard"] = os.path.join(out, "tensorboard", stage, name)
    _available(cfg.run.tracking)
    if "mlflow" in cfg.run.tracking:
        spec["mlflow"], spec["mlflow_experiment"] = prepare_mlflow(cfg, stage)
    return spec


_prepared: dict = {}  # (uri, stage) -> experiment id, once per process


def prepare_mlflow(cfg, stage: str) -> tuple[str, str]:
    """(the store's URI, the stage's experiment id): the store and the experiment made once per process,
    before any worker of it logs. MLflow migrates a new SQLite store on first use, and two processes doing
    it at once (two sweep trials, two commands) break it ("duplicate column name"): a file lock beside the
    database makes them take turns."""
    uri = cfg.run.mlflow_uri or "sqlite:///" + os.path.join(os.path.abspath(cfg.run.out_dir), "mlflow.db")
    if (uri, stage) not in _prepared:
        _available(["mlflow"])
        from mlflow.tracking import MlflowClient

        with _store_lock(uri):
            _prepared[(uri, stage)] = _experiment(MlflowClient(tracking_uri=uri), f"raykd-{stage}")
    return uri, _prepared[(uri, stage)]


def _store_lock(uri: str):
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        return FileLock(uri[len("sqlite:///"):] + ".lock")
    return contextlib.nullcontext()  # a tracking server migrates its own store


def _experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by another process since the lookup
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _available(backends) -> None:
    import importlib

    for b, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")):
        if b in backends:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"run.tracking: {b} is not installed: pip install 'raykd[tracking]'") from None


def _flat(tree, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow's limit on a parameter's value
    return out


class Tracker:
    """A job's tracking in its worker: `log(metrics, epoch)` after every epoch, `close(status)` at the end."""

    def __init__(self, spec: dict | None):
        self.spec, self.writer, self.client, self.run_id = spec, None, None, None
        if not spec:
            return
        if spec.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(spec["tensorboard"])
        if spec.get("mlflow"):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec["mlflow"])
            exp_id = spec["mlflow_experiment"]
            found = self.client.search_runs([exp_id], f"tags.`raykd.run_name` = '{spec['run_name']}'", max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                run = self.client.create_run(exp_id, run_name=spec["name"],
                                             tags={"raykd.run_name": spec["run_name"], "raykd.stage": spec["stage"]})
                self.run_id = run.info.run_id
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in spec["params"].items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
                    self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, metrics: dict, epoch: int) -> None:
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch"}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, epoch)
            self.writer.flush()
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
