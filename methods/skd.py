"""SKD — student-friendly knowledge distillation (arXiv:2305.10893, 2023; abstract only).

Paper (abstract): soften the teacher's logits with a temperature, then a "learning simplifier" (an
attention mechanism) turns them into a simpler target for the student; the simplifier is trained
jointly with the student through the distillation loss; the loss form is unchanged, so SKD composes
with other logit methods.

What that loss optimises: a simplifier trained through the student's KD term KL(target || p_s) has,
whatever its form, the member of its family nearest the student as its optimum, so it collapses onto
the student (the readings that did so: docs/methods.md, *Earlier readings*).

Our reading now: the simplifier softens or sharpens the teacher per sample — the paper's "softening
processing ... simplifies the output", made adaptive — and is trained on its own objective, never
through the student's loss. Self-attention over one sample's C classes (each class a token: its
softened logit embedded to `dim` plus a learned class embedding, one head) is pooled to one scalar s(x),
    p^(x) = softmax(z_t / tau(x)),   tau(x) = tau * r^tanh(s(x)),   r = `max_ratio` (2),
with the output projection at zero, so training starts exactly as KD. Its objective is the label's
cross-entropy under the target, CE(p^, y) (`w_simplifier`), with the teacher's logits detached and the
target detached in the student's KD term. Per sample that is minimised by the sharpest temperature
(tau / r) where the teacher ranks the label first and, where it does not, by a softer one (for large
tau(x) p^ tends to uniform, which puts more on y than a confident wrong answer does); seeing only the
teacher's logits, the simplifier learns how likely the teacher is to be right from the shape of its
output: confident, reliable targets sharpen, doubtful ones soften. The target keeps the teacher's
ranking of the classes and the ratios of its log-odds (tested), and it does not depend on the student,
so it cannot collapse onto it. The student's loss is KD's, L = w_ce CE(z_s, y) + w_kd tau^2 KL(p^ ||
p_s^tau). The simplifier is dropped after training (saved apart, method.safetensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.methods.kd import KDTerms, kd_loss
from raykd.pipeline.core.schema import Section  # noqa: F401


class SKDOptions(KDTerms):
    """KD's options and defaults, plus the simplifier's."""

    max_ratio: float = Field(2.0, gt=1, description="the per-sample temperature stays within [tau / r, tau * r]")
    w_simplifier: float = Field(1.0, ge=0, description="weight of the simplifier's own objective CE(target, y)")
    dim: int = Field(32, gt=0, description="embedding width of the simplifier's class tokens")


class Simplifier(nn.Module):
    """z (B, C), already divided by tau -> log2 of the per-sample temperature factor, in [-1, 1] x log2 r;
    0 at initialisation."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embed = nn.Linear(1, dim)
        self.cls = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(z.unsqueeze(-1)) + self.cls  # (B, C, dim)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return torch.tanh(self.out(mixed.mean(1)).squeeze(-1))  # (B,)


def simplified_logits(simplifier: Simplifier, z_teacher: torch.Tensor, temperature: float,
                      max_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z^, tau(x)): logits whose softmax at tau is the teacher's softmax at tau(x), i.e. z^ = z_t tau / tau(x)."""
    tau_x = temperature * torch.exp(simplifier(z_teacher / temperature) * math.log(max_ratio))
    return z_teacher * (temperature / tau_x).unsqueeze(1), tau_x


@METHODS.register("skd")
class SKD(Method):
    Options = SKDOptions

    version = 3  # 3: a per-sample temperature trained on CE(target, y) (2: free logits, the anchor carried tau^2)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.simplifier = Simplifier(ctx.num_classes, cfg.skd.dim)

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.skd
        ce = F.cross_entropy(logits, labels)
        kd = sc = tau = 0.0
        for w, z in self.soft_targets(targets, o.temperature, labels, logits):
            z_hat, tau_x = simplified_logits(self.simplifier, z, o.temperature, o.max_ratio)
            kd = kd + w * kd_loss(logits, z_hat.detach(), o.temperature)  # the student's loss cannot move the target
            sc = sc + w * F.cross_entropy(z_hat / o.temperature, labels)  # the simplifier's own objective
            tau = tau + w * tau_x.mean()
        return {"loss": o.w_ce * ce + o.w_kd * kd + o.w_simplifier * sc, "ce": ce, "kd": kd, "simplifier_ce": sc,
                "tau": torch.as_tensor(tau)}
