"""KD — Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network" (reference, exact).

Paper: L = w_ce * CE(z_s, y) + w_kd * tau^2 * KL(p_t^tau || p_s^tau); the tau^2 keeps the soft term's
gradients on the scale of the hard term's. Defaults tau=4, w_ce=0.1, w_kd=0.9 are the CIFAR-100
convention of RepDistiller/mdistiller.
Our reading (multi-teacher, methods/ensemble.py): the teacher target is the mean of the teachers'
probabilities (`method.ensemble=mean_prob`), or their mean logits, fixed or accuracy weights, or the
mean of per-teacher losses (`per_teacher`). `teacher_temperature` softens the teacher at another
temperature than the student (the mixture is formed at `temperature`, then its logits rescaled), the
fixed-temperature baseline that SKD's per-sample temperature reduces to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.pipeline.core.schema import Section


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float,
            reduction: str = "mean") -> torch.Tensor:
    """tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), summed over classes; batch mean or per sample."""
    log_ps = F.log_softmax(logits_student / temperature, dim=1)
    log_pt = F.log_softmax(logits_teacher / temperature, dim=1)
    per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(1) * temperature ** 2
    return per_sample.mean() if reduction == "mean" else per_sample


class KDTerms(Section):
    """What KD-shaped methods share: the temperature and the two weights."""

    temperature: float = Field(4.0, gt=0)
    w_ce: float = Field(0.1, ge=0)
    w_kd: float = Field(0.9, ge=0)


class KDOptions(KDTerms):
    teacher_temperature: float | None = Field(
        None, gt=0, description="soften the teacher at this temperature instead (the student stays at `temperature`): "
                                "SKD's reduction to a fixed temperature; None = `temperature`")


@METHODS.register("kd")
class KD(Method):
    Options = KDOptions

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.kd
        ce = F.cross_entropy(logits, labels)
        # the teacher softened at tau_t, the student at tau: softmax(z tau / tau_t / tau) = softmax(z / tau_t)
        scale = 1.0 if o.teacher_temperature is None else o.temperature / o.teacher_temperature
        kd = sum(w * kd_loss(logits, z * scale, o.temperature)
                 for w, z in self.soft_targets(targets, o.temperature, labels, logits))
        return {"loss": o.w_ce * ce + o.w_kd * kd, "ce": ce, "kd": kd}
