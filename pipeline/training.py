"""Pieces shared by every training loop: splits as Ray Datasets, view batches, optimiser and schedule, evaluation."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.data import Split, normalize
from pipeline.views import ViewPolicy, make_views


def worker_setup(torch_threads: int | None, seed: int) -> tuple[int, int, "torch.device"]:
    """The start of every Train loop: torch threads, the seed; returns (rank, world size, device)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    set_worker_threads(torch_threads)
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def set_worker_threads(explicit: int | None) -> int:
    """Torch threads for this Train worker. Ray sets OMP_NUM_THREADS to the worker's CPU count (often 1);
    by default the workers on a node share its cores instead."""
    import os

    import ray.train

    n = explicit or max(1, (os.cpu_count() or 1) // max(1, ray.train.get_context().get_local_world_size()))
    torch.set_num_threads(n)
    return n


def split_to_ray(split: Split, rows_per_block: int = 4096):
    """A split as a Ray Dataset of rows {sample_id, label, image (H, W, C) uint8 tensor}."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    tables = []
    for s in range(0, len(split), rows_per_block):
        e = s + rows_per_block
        tables.append(pa.table({
            "sample_id": pa.array(split.ids[s:e]),
            "label": pa.array(split.labels[s:e]),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.images[s:e])),
        }))
    return ray.data.from_arrow(tables)


def view_batch(batch: dict, epoch_view: int, data_seed: int, policy: ViewPolicy, mean, std, device):
    """Render view `epoch_view` of each sample in a Ray batch and normalise it: -> (x float BCHW, y)."""
    ids = batch["sample_id"].numpy()
    pixels, _ = make_views(batch["image"].numpy(), ids, epoch_view, data_seed, policy)
    x = normalize(torch.from_numpy(pixels).to(device, non_blocking=True), mean, std)
    return x, batch["label"].to(device, dtype=torch.long)


def lr_lambda(schedule: str, total_steps: int, steps_per_epoch: int = 1, milestones=(), gamma: float = 0.1):
    """Multiplier of the base lr at step t. Progress is clamped, so an uneven last shard never overruns.
    `multistep`: times gamma at each milestone epoch (the RepDistiller/mdistiller recipe)."""
    total = max(1, total_steps)

    def f(step: int) -> float:
        p = min(step / total, 1.0)
        if schedule == "constant":
            return 1.0
        if schedule == "multistep":
            return gamma ** sum(step >= m * steps_per_epoch for m in milestones)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        # one-cycle: linear warm-up over the first 30 % from lr/25, then cosine to ~0 (as torch's OneCycleLR)
        if p < 0.3:
            return 0.04 + 0.96 * p / 0.3
        return 0.5 * (1 + math.cos(math.pi * (p - 0.3) / 0.7)) + 1e-4

    return f


def make_optimizer(params, optim_cfg, steps_per_epoch: int, epochs: int, lr: float | None = None):
    opt = torch.optim.SGD(
        params,
        lr=lr or optim_cfg.lr,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        nesterov=optim_cfg.nesterov and optim_cfg.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim_cfg.schedule, steps_per_epoch * epochs, steps_per_epoch,
                                                             optim_cfg.milestones, optim_cfg.gamma))
    return opt, sched


def optimizer_step(opt, sched, loss: torch.Tensor, params, grad_clip: float | None) -> None:
    """One SGD step of a training loop: backward, the optional global gradient-norm clip (`optim.grad_clip`),
    the optimizer's and the schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, mean, std, device,
             batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean CE) of `model` on un-augmented uint8 images (N, H, W, C)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for s in range(0, len(labels), batch_size):
        x = normalize(images_u8[s:s + batch_size].to(device), mean, std)
        y = labels[s:s + batch_size].to(device)
        logits = model(x)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(1, len(labels))
    return correct / n, loss / n


def collect(iterator, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a whole (small) Ray dataset shard into CPU tensors: (images uint8, labels)."""
    xs, ys = [], []
    for b in iterator.iter_torch_batches(batch_size=batch_size, device="cpu",
                                         dtypes={"image": torch.uint8, "label": torch.long, "sample_id": torch.long}):
        xs.append(b["image"])
        ys.append(b["label"])
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------------------
# the training loops' checkpoints: one torch file of plain tensors and numbers, loaded weights-only

STATE_FILE = "train_state.pt"


def checkpoint_state(checkpoint) -> dict:
    """The state saved in a Ray Train checkpoint (a restarted worker's, or a finished run's)."""
    import os

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def restored_state() -> dict | None:
    """In a Train worker: the last checkpoint's state when this run restarted (or was rerun), else None.
    An unreadable checkpoint is an error naming it; nothing is deleted (the ones before it stay too)."""
    import os

    import ray.train

    from pipeline.errors import CheckpointError

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    try:
        return checkpoint_state(ckpt)
    except Exception as e:
        run_dir = os.path.dirname(ckpt.path.rstrip("/"))
        raise CheckpointError(
            f"Ray Train checkpoint {ckpt.path} is unreadable ({e.__class__.__name__}: {str(e)[:200]}); it is kept, "
            f"with the ones before it (Ray Train resumes from the newest only). To start this run over, remove "
            f"{run_dir} (a student can also take another distill.name)") from None


def failure_reason(e: Exception) -> str:
    """One line saying why a Ray Train run failed: a worker's own error when Ray Train gives one."""
    for exc in (getattr(e, "worker_failures", None) or {}).values():
        lines = [ln.strip() for ln in str(getattr(exc, "cause", None) or exc).splitlines() if ln.strip()]
        if lines:
            return lines[-1][:500]
    return str(e).strip().splitlines()[0][:300]


def report_epoch(metrics: dict, state: dict | None) -> None:
    """`ray.train.report` on every worker (it is a barrier); rank 0 passes `state`, saved as the checkpoint."""
    import os
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if state is not None:
            torch.save(state, os.path.join(d, STATE_FILE))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
