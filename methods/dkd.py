"""DKD — Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (reference, exact; AEKT builds on it).

Paper: KD splits into target-class KD (TCKD: binary [p_target, 1 - p_target] of teacher vs student)
and non-target KD (NCKD: the distribution over the other classes), KD = TCKD + (1 - p_t,target) NCKD;
DKD weights them freely: L = w_ce CE + min(epoch / warmup, 1) (alpha TCKD + beta NCKD), each term
scaled by tau^2. Defaults w_ce=1, alpha=1, beta=8, tau=4, warmup=20 epochs (mdistiller's CIFAR-100).
As in mdistiller, the non-target distribution is a softmax after subtracting 1000 from the target
logit (divided by tau). The binary distribution is computed in log space (logsumexp) rather than as
log of summed probabilities, which is the same value without its underflow.
Our reading (multi-teacher): the teacher logits are the ensemble target of `method.ensemble`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.pipeline.core.schema import Section


def _binary_log_probs(logits: torch.Tensor, gt: torch.Tensor, temperature: float) -> torch.Tensor:
    """log [p_target, 1 - p_target] at temperature tau, (B, 2)."""
    logp = F.log_softmax(logits / temperature, dim=1)
    log_target = logp.gather(1, gt[:, None])
    log_other = torch.logsumexp(logp.masked_fill(F.one_hot(gt, logits.shape[1]).bool(), float("-inf")), dim=1,
                                keepdim=True)
    return torch.cat([log_target, log_other], dim=1)


def dkd_terms(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor, temperature: float,
              reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each tau^2 * KL(teacher || student); batch means, or per sample with reduction='none'."""
    t2 = temperature ** 2
    bs, bt = (_binary_log_probs(z, target, temperature) for z in (logits_student, logits_teacher))
    tckd = (bt.exp() * (bt - bs)).sum(1) * t2
    mask = 1000.0 * F.one_hot(target, logits_student.shape[1]).to(logits_student.dtype)
    ns = F.log_softmax(logits_student / temperature - mask, dim=1)
    nt = F.log_softmax(logits_teacher / temperature - mask, dim=1)
    nckd = (nt.exp() * (nt - ns)).sum(1) * t2
    if reduction == "mean":
        return tckd.mean(), nckd.mean()
    return tckd, nckd


def dkd_loss(logits_student, logits_teacher, target, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD (mdistiller's `dkd_loss`, without the warm-up, which needs the epoch)."""
    tckd, nckd = dkd_terms(logits_student, logits_teacher, target, temperature)
    return alpha * tckd + beta * nckd


def warmup_factor(epoch: int, warmup: int) -> float:
    """min(epoch / warmup, 1), epochs counted from 1; warmup 0 means none."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


class DKDOptions(Section):
    temperature: float = Field(4.0, gt=0)
    w_ce: float = Field(1.0, ge=0)
    alpha: float = Field(1.0, ge=0, description="weight of TCKD")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (2 for resnet56->resnet20, 6 for wrn40-2 pairs)")
    warmup: int = Field(20, ge=0, description="epochs over which the KD terms ramp up linearly (0 = none)")


@METHODS.register("dkd")
class DKD(Method):
    Options = DKDOptions

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.dkd
        ce = F.cross_entropy(logits, labels)
        tckd = nckd = 0.0
        for w, z in self.soft_targets(targets, o.temperature, labels, logits):
            t, n = dkd_terms(logits, z, labels, o.temperature)
            tckd, nckd = tckd + w * t, nckd + w * n
        warm = warmup_factor(epoch, o.warmup)
        return {"loss": o.w_ce * ce + warm * (o.alpha * tckd + o.beta * nckd), "ce": ce, "tckd": tckd, "nckd": nckd}
