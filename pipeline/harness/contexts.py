"""Where a running job reports and keeps its checkpoints: `LocalContext` (one worker: a Ray task or this
process; checkpoints under `<storage>/<run name>/`, the newest kept) and `TrainContext` (Ray Train's
workers: `ray.train.report`), over one `CheckpointStore`.
"""

from __future__ import annotations

import io
import json
import os

import torch

from raykd.pipeline.core.errors import CheckpointError, RaykdError
from raykd.pipeline.core.records import LatestCheckpoint, check
from raykd.pipeline.harness.job import Job

STATE_FILE = "train_state.pt"


LATEST = "latest.json"


class Context:
    rank = 0
    world = 1
    device = torch.device("cpu")

    def restore(self) -> dict | None:
        raise NotImplementedError

    def report(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shard(self, name: str):
        raise RaykdError(f"dataset {name!r} is only streamed under Ray Train")


class TrainContext(Context):
    """Inside a Ray Train worker: its rank, DDP, Ray Train's checkpoints and dataset shards."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        c = ray.train.get_context()
        self.rank, self.world = c.get_world_rank(), c.get_world_size()
        self.local_world = c.get_local_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        try:
            with ckpt.as_directory() as d:
                return _load_state(open(os.path.join(d, STATE_FILE), "rb").read())
        except Exception as e:
            raise _unreadable(ckpt.path, os.path.dirname(ckpt.path.rstrip("/")), e) from None

    def report(self, metrics: dict, state: dict | None) -> None:
        """`ray.train.report` on every worker (a barrier); rank 0 attaches the checkpoint."""
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None:
                torch.save(state, os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce(self, t):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def shard(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)


class LocalContext(Context):
    """One process trains alone: checkpoints in a `CheckpointStore`; each epoch also reported to Ray Tune
    when this process is a Tune trial."""

    def __init__(self, job: Job, tune: bool = False):
        self.store = CheckpointStore(job.storage, job.run_name, job.keep)
        self.tune = tune
        self.device = torch.device("cuda" if job.device == "cuda" and torch.cuda.is_available() else "cpu")
        self.last_state: dict | None = None

    def restore(self) -> dict | None:
        return self.store.latest()

    def report(self, metrics: dict, state: dict | None) -> None:
        self.store.save(state, int(metrics["epoch"]))
        self.last_state = state
        if self.tune:
            from ray import tune

            tune.report({k: v for k, v in metrics.items() if v is not None})


def _load_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _unreadable(path: str, run_dir: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unreadable ({e.__class__.__name__}: {str(e)[:200]}); it is kept, with the ones "
        f"before it (training resumes from the newest only). To start this run over, remove {run_dir} "
        "(a student can also take another distill.name)")


class CheckpointStore:
    """A single-worker job's checkpoints: `<storage>/<run>/checkpoint_<epoch>/train_state.pt` (the file
    Ray Train's checkpoints hold too), the newest named by `<run>/latest.json`, written after the state it
    names; the `keep` newest are kept. Local disk or any pyarrow filesystem (S3 with run.storage_path)."""

    def __init__(self, storage: dict, run_name: str, keep: int = 2):
        from pyarrow import fs as pafs

        if storage.get("storage_filesystem") is not None:
            self.fs, base = storage["storage_filesystem"], storage["storage_path"]
        else:
            self.fs, base = pafs.FileSystem.from_uri(storage["storage_path"])
        self.dir = f"{base.rstrip('/')}/{run_name}"
        self.display = (storage["storage_path"] if "://" in storage["storage_path"] or
                        storage.get("storage_filesystem") is None else "s3://" + storage["storage_path"])
        self.display = f"{self.display.rstrip('/')}/{run_name}"
        self.keep = keep

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def latest(self) -> dict | None:
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(f"{self.dir}/{LATEST}")
        if info.type == pafs.FileType.NotFound:
            return None
        try:
            name = check(json.loads(self._read(f"{self.dir}/{LATEST}")), LatestCheckpoint,
                         f"{self.display}/{LATEST}", "checkpoint pointer")["checkpoint"]
        except (ValueError, RaykdError) as e:
            raise _unreadable(f"{self.display}/{LATEST}", self.display, e) from None
        path = f"{self.dir}/{name}/{STATE_FILE}"
        try:
            return _load_state(self._read(path))
        except Exception as e:
            raise _unreadable(f"{self.display}/{name}", self.display, e) from None

    def save(self, state: dict | None, epoch: int) -> None:
        from pyarrow import fs as pafs

        if state is None:
            return
        name = f"checkpoint_{epoch:06d}"
        self.fs.create_dir(f"{self.dir}/{name}", recursive=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        self._write(f"{self.dir}/{name}/{STATE_FILE}", buf.getvalue())
        self._write(f"{self.dir}/{LATEST}", json.dumps({"checkpoint": name, "epoch": epoch}).encode())
        old = sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.dir))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        for stale in old[:-self.keep]:
            self.fs.delete_dir(f"{self.dir}/{stale}")
