"""Pieces shared by every training loop: the optimiser and its schedule, one step, evaluation."""

from __future__ import annotations

import math

import torch

from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.data.datasets import normalize


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


class Precision:
    """`optim.precision`: `autocast()` around a model's forward (a no-op for fp32), and for fp16 the loss
    scaler of `optimizer_step`. fp16 needs CUDA (CPU autocast to fp16 is slow and unscaled here)."""

    def __init__(self, precision: str, device):
        self.device_type = torch.device(device).type
        if precision == "fp16" and self.device_type != "cuda":
            raise ConfigError(f"optim.precision=fp16 needs a CUDA device (this job runs on {self.device_type}); "
                              "use bf16 on CPU")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self):
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def optimizer_step(opt, sched, loss: torch.Tensor, params, grad_clip: float | None, scaler=None) -> None:
    """One SGD step of a training loop: backward, the optional global gradient-norm clip (`optim.grad_clip`),
    the optimizer's and the schedule's step; with fp16's `scaler`, the loss scaled and the gradients
    unscaled before the clip (a step with inf/nan gradients is skipped by the scaler)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
    sched.step()


@torch.no_grad()
def _accuracy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, len(y), batch_size):
        logits = model(x[s:s + batch_size])
        loss += torch.nn.functional.cross_entropy(logits, y[s:s + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[s:s + batch_size]).sum()
    model.train(was_training)
    n = max(1, len(y))
    return float(correct) / n, float(loss) / n


def evaluate(model: torch.nn.Module, images_u8, labels, mean, std, device,
             batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean CE) of `model` on un-augmented uint8 images (N, H, W, C): an array or tensor, or a
    streamed folder's FileImages (decoded `batch_size` at a time)."""
    from raykd.pipeline.data.datasets import FileImages, chunks

    labels = torch.as_tensor(labels)
    if isinstance(images_u8, FileImages):
        correct = loss = 0.0
        for s, batch in chunks(images_u8, batch_size):
            acc, ce = _accuracy_loss(model, normalize(torch.from_numpy(batch).to(device), mean, std),
                                     labels[s:s + len(batch)].to(device), batch_size)
            correct, loss = correct + acc * len(batch), loss + ce * len(batch)
        n = max(1, len(labels))
        return correct / n, loss / n
    x = normalize(torch.as_tensor(images_u8).to(device), mean, std)
    return _accuracy_loss(model, x, labels.to(device), batch_size)


class Evaluator:
    """Accuracy and mean CE on fixed splits after every epoch: each split normalised once, on the device."""

    def __init__(self, splits: dict, mean, std, device):
        from raykd.pipeline.data.datasets import FileImages

        self.mean, self.std, self.device = mean, std, device
        self.sets = {name: (s.images, torch.tensor(s.labels, dtype=torch.int64)) if isinstance(s.images, FileImages)
                     else (normalize(torch.tensor(s.images).to(device), mean, std),
                           torch.tensor(s.labels, dtype=torch.int64).to(device))
                     for name, s in splits.items()}  # a streamed folder's splits are decoded at every call

    def __call__(self, model: torch.nn.Module, skip: tuple = ()) -> dict:
        out = {}
        for name, (x, y) in self.sets.items():
            if name in skip:
                continue
            if isinstance(x, torch.Tensor):
                acc, loss = _accuracy_loss(model, x, y)
            else:
                acc, loss = evaluate(model, x, y, self.mean, self.std, self.device)
            out[f"{name}_loss"], out[f"{name}_acc"] = loss, acc
        return out
