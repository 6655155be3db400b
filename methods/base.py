"""What every distillation method shares: the method interface, the registry, and multi-teacher targets.

A method is an `nn.Module`: its own trainable parts (if any) are its parameters, so they join the
student's optimiser and its checkpoint. `forward` gets the student's logits and named stages, the
batch's teacher outputs and labels, and returns named loss terms with the total under `loss`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.registry import Registry

METHODS: Registry = Registry("method")


@dataclass
class MethodContext:
    """What a method may know when it is built: classes, teachers (with their val accuracy), epochs."""

    num_classes: int
    teachers: list[str]
    teacher_val_acc: dict[str, float] = field(default_factory=dict)
    epochs: int = 1
    student_stages: dict[str, tuple[int, int, int]] = field(default_factory=dict)


@dataclass
class Targets:
    """One batch's teacher outputs, float32 on the training device: `logits[teacher]` is (B, C)."""

    logits: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module, metaclass=ABCMeta):
    """Base class. `uses_teachers = False` for methods that need no teacher output (the CE baseline)."""

    uses_teachers = True

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx

    def columns(self) -> list[str]:
        """Cache columns this method reads besides the view and its label."""
        return [f"logits.{t}" for t in self.ctx.teachers] if self.uses_teachers else []

    @abstractmethod
    def forward(self, logits: torch.Tensor, stages: dict[str, torch.Tensor], targets: Targets, labels: torch.Tensor,
                epoch: int) -> dict[str, torch.Tensor]:
        """`epoch` counts from 1. Returns {"loss": total, <term>: value, ...}."""

    def teacher_weights(self) -> dict[str, float]:
        """Per-teacher weights of `method.ensemble=weighted` (normalised): fixed, or by validation accuracy."""
        w = self.cfg.teacher_weights
        if w is None or w == "val_acc":
            w = {t: self.ctx.teacher_val_acc.get(t, 1.0) for t in self.ctx.teachers}
        total = sum(w[t] for t in self.ctx.teachers)
        return {t: w[t] / total for t in self.ctx.teachers}

    def soft_target(self, targets: Targets, temperature: float) -> list[torch.Tensor]:
        """The teacher logits a logit method distils from, per `method.ensemble`.

        `mean_prob` / `weighted` return one tensor z~ = tau * log(sum_t w_t softmax(z_t / tau)), whose
        softmax at tau is exactly the (weighted) mean of the teachers' probabilities, so one loss
        function serves single teachers and ensembles alike; `mean_logit` the mean logits; `per_teacher`
        every teacher's own logits (the caller averages the per-teacher losses). Always detached.
        """
        zs = [targets.logits[t].detach() for t in self.ctx.teachers]  # teachers are frozen
        mode = self.cfg.ensemble
        if mode == "per_teacher" or len(zs) == 1:
            return zs
        if mode == "mean_logit":
            return [torch.stack(zs).mean(0)]
        w = self.teacher_weights() if mode == "weighted" else {t: 1.0 / len(zs) for t in self.ctx.teachers}
        z = torch.stack(zs)  # (N, B, C)
        log_w = torch.tensor([w[t] for t in self.ctx.teachers], dtype=z.dtype, device=z.device).log().view(-1, 1, 1)
        return [temperature * torch.logsumexp(F.log_softmax(z / temperature, dim=2) + log_w, dim=0)]


def build_method(cfg, ctx: MethodContext) -> Method:
    """`cfg` is the config's `method` section; the class is looked up by `cfg.name`."""
    return METHODS.get(cfg.name)(cfg, ctx)
