"""AEKT — adaptive explicit knowledge transfer (Park & Lee, arXiv:2409.01679, 2024; abstract only).

Paper (abstract): logit-based distillation; implicit knowledge is the teacher's non-target
distribution, explicit knowledge the teacher's confidence in the target class, transferred with an
adaptively learned weight; classification and distillation are separated into two tasks, and that
separation models inter-class relations.
Our reading (each choice a `method.aekt` option):
- a task-serialization layer W = I + D (C x C, D zero at the start, zero bias; `bias`) after the
  student's classifier: z_cls (-> CE, and the only output at inference: the exported student has no
  extra parameter) and z_kd = W(z_cls) (-> distillation); W lives in the method, so it is trained and
  checkpointed with the student and saved apart (method.safetensors). Weight decay acts on D, so it
  pulls W towards the identity (no separation decays to "none"); a plain C x C weight under decay was
  pulled towards 0, i.e. towards z_kd = 0 and a uniform distillation head (see docs/methods.md,
  *Earlier readings*);
- explicit term L_ek = w * TCKD(z_t, z_kd) with the adaptive weight
  w = stopgrad(clamp(p_t,target / p_s,target, 0, w_max)), per sample, probabilities at tau (`w_max`),
  used as it is (the abstract's reading; `normalize: true`, our addition, divides it by its batch mean
  so that it reweights samples without scaling the term: chosen against on validation in the 100-class
  benchmark, 68.19 % against 68.64 % mean val over 5 seeds, docs/benchmarks.md);
- implicit term L_ik = NCKD(z_t, z_kd);
- L = w_ce * CE(z_cls, y) + min(epoch / warmup, 1) * (alpha * L_ek + beta * L_ik), DKD's defaults;
- the serialization layer trains at `lr_factor` (0.01) times the student's learning rate: D's gradient
  is g z^T, so a step moves z_kd by ~ lr |z|^2 g, and with |z| ~ 10-20 the layer diverges at a
  student's peak learning rate (the factor was chosen on validation accuracy: docs/methods.md). ||D||
  (`D_norm`) and the largest adaptive weight applied (`w_peak`) are logged per step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.methods.dkd import DKDOptions, dkd_terms, warmup_factor


def adaptive_weight(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
                    temperature: float, w_max: float) -> torch.Tensor:
    """clamp(p_t,target / p_s,target, 0, w_max) per sample, detached: a weight, not a path for gradients."""
    with torch.no_grad():
        pt = F.softmax(logits_teacher / temperature, 1).gather(1, target[:, None]).squeeze(1)
        ps = F.softmax(logits_student / temperature, 1).gather(1, target[:, None]).squeeze(1)
        return (pt / ps.clamp_min(1e-12)).clamp(0, w_max)


def aekt_terms(z_kd: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor, temperature: float,
               w_max: float, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_ek, L_ik, mean adaptive weight, largest weight applied): the explicit and implicit terms on the
    distillation head. With `normalize`, the weights are divided by their batch mean: they reweight
    samples, not the term (and one sample may then weigh up to w_max / mean)."""
    tckd, nckd = dkd_terms(z_kd, logits_teacher, target, temperature, reduction="none")
    w = adaptive_weight(z_kd, logits_teacher, target, temperature, w_max)
    mean_w = w.mean()
    if normalize:
        w = w / mean_w.clamp_min(1e-12)
    return (w * tckd).mean(), nckd.mean(), mean_w, w.max()


class AEKTOptions(DKDOptions):
    """DKD's options and defaults, plus the adaptive weight's and the serialization layer's."""

    w_max: float = Field(5.0, gt=0, description="cap of the adaptive weight p_t,target / p_s,target")
    normalize: bool = Field(False, description="divide the adaptive weights by their batch mean (our addition; off: chosen on val)")
    bias: bool = Field(True, description="the task-serialization layer has a bias (initialised to 0)")
    lr_factor: float = Field(0.01, gt=0, description="the serialization layer trains at this times the student's lr")


class Serialization(nn.Module):
    """z -> z + z D^T + b: the identity plus a learned deviation D (zero at the start), so that weight decay
    (on D and b) pulls the layer towards the identity."""

    def __init__(self, num_classes: int, bias: bool):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(num_classes, num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """W = I + D."""
        return torch.eye(self.delta.shape[0], device=self.delta.device, dtype=self.delta.dtype) + self.delta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + F.linear(z, self.delta, self.bias)


@METHODS.register("aekt")
class AEKT(Method):
    Options = AEKTOptions

    version = 3  # 3: the serialization layer's own lr factor, ||D|| and the weights' spread logged (2: W = I + D)

    def param_groups(self):
        return [{"params": list(self.parameters()), "lr_factor": self.cfg.aekt.lr_factor}]  # the serialization layer's

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.serialize = Serialization(ctx.num_classes, cfg.aekt.bias)

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.aekt
        ce = F.cross_entropy(logits, labels)
        z_kd = self.serialize(logits)
        ek = ik = w_mean = 0.0
        peaks = []
        for w, z in self.soft_targets(targets, o.temperature, labels, z_kd):
            e, i, m, peak = aekt_terms(z_kd, z, labels, o.temperature, o.w_max, o.normalize)
            ek, ik, w_mean = ek + w * e, ik + w * i, w_mean + w * m
            peaks.append(peak)
        self.logged["w_peak"] = torch.stack(peaks).max()  # the largest weight one sample got (after `normalize`)
        self.logged["D_norm"] = self.serialize.delta.detach().norm()
        warm = warmup_factor(epoch, o.warmup)
        return {"loss": o.w_ce * ce + warm * (o.alpha * ek + o.beta * ik), "ce": ce, "explicit": ek, "implicit": ik,
                "adaptive_w": torch.as_tensor(w_mean)}
