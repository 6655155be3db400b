"""Multi-teacher targets: how K teachers' logits become the one target a logit method distils from.

`method.ensemble` picks the rule. Every rule but `mean_logit` and `per_teacher` is a convex combination
of the teachers' probabilities at the method's temperature tau, p~ = sum_k w_k(x) p_k^tau, handed to the
method as the logits z~ = tau log p~ (so softmax(z~ / tau) = p~ exactly and one loss serves one teacher
and an ensemble alike). The weights w (B, K), rows on the simplex:

- `mean_prob`: 1/K.
- `weighted`: one weight per teacher, fixed (`method.teacher_weights`) or from the teachers' validation
  accuracy a_k: proportional to a_k, or softmax(a_k / T) with `method.weight_temperature` T (accuracies
  of 0.86 / 0.855 / 0.81 give 0.34 / 0.34 / 0.32 proportionally, 0.61 / 0.37 / 0.01 at T = 0.01).
- `ca_mkd` — Zhang, Chen & Wang, "Confidence-aware multi-teacher knowledge distillation", ICASSP 2022:
  w_k(x) = (1 - softmax_k(CE(z_k, y))) / (K - 1), the cross-entropy of teacher k's prediction (tau = 1)
  on the label: a teacher confident in the right class weighs more, per sample. Paper and ours agree;
  the paper also weights intermediate features, which we do not.
- `entropy` — Kwon et al., "Adaptive knowledge distillation based on entropy", ICASSP 2020 (EBKD):
  w_k(x) = 1 - H_k(x) / sum_j H_j(x), H_k the entropy of teacher k's prediction (tau = 1). The paper's
  weights sum to K - 1; ours are divided by K - 1 so that p~ is a distribution (the same ratios).
- `ae_kd` — Du et al., "Agree to disagree: adaptive ensemble knowledge distillation in gradient space",
  NeurIPS 2020: the teachers' KD gradients with respect to the student's logits, g_k = (p_s - p_k) / tau
  per sample, are combined with the min-norm convex weights, min_{w in simplex} || sum_k w_k G_k ||^2
  over the batch (G_k: the batch's g_k stacked), solved by Frank-Wolfe with exact line search (MGDA's
  solver; K is small). One w per batch. Since sum_k w_k (p_s - p_k) = p_s - sum_k w_k p_k, that is KD
  towards the w-mixture of the teachers, which is how it is applied (to DKD and AEKT alike). The paper's
  extra lower bound on the weights and its feature-level term are left out.

Weights are computed without gradients (teachers are frozen; the student's logits only steer `ae_kd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PER_SAMPLE = ("ca_mkd", "entropy", "ae_kd")


def mix_logits(zs: list[torch.Tensor], temperature: float, weights: torch.Tensor) -> torch.Tensor:
    """tau * log(sum_k w_k softmax(z_k / tau)); `weights` (K,) or (B, K), rows summing to 1."""
    z = torch.stack(zs)  # (K, B, C)
    w = weights.to(z.dtype)
    w = w.view(-1, 1, 1) if w.dim() == 1 else w.t().unsqueeze(2)  # (K, 1 or B, 1)
    return temperature * torch.logsumexp(F.log_softmax(z / temperature, dim=2) + w.log(), dim=0)


def ca_mkd_weights(zs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(B, K): (1 - softmax over teachers of CE(z_k, y)) / (K - 1)."""
    k = len(zs)
    ce = torch.stack([F.cross_entropy(z.float(), labels, reduction="none") for z in zs], dim=1)
    return (1 - F.softmax(ce, dim=1)) / (k - 1)


def entropy_weights(zs: list[torch.Tensor]) -> torch.Tensor:
    """(B, K): (1 - H_k / sum_j H_j) / (K - 1), H_k the entropy of softmax(z_k)."""
    k = len(zs)
    h = torch.stack([-(F.softmax(z.float(), 1) * F.log_softmax(z.float(), 1)).sum(1) for z in zs], dim=1)
    return (1 - h / h.sum(1, keepdim=True).clamp_min(1e-12)) / (k - 1)


def min_norm_weights(grads: torch.Tensor, iters: int = 64, tol: float = 1e-9) -> torch.Tensor:
    """(K,) on the simplex minimising || sum_k w_k grads[k] ||^2, grads (K, D): Frank-Wolfe on the Gram
    matrix with exact line search, from the uniform weights. The K x K Gram matrix is solved on the host:
    one copy from the device, not a synchronisation per iteration."""
    g = grads.double()
    m = (g @ g.t()).cpu()  # (K, K)
    k = m.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=m.dtype)
    for _ in range(iters):
        mw = m @ w
        t = int(torch.argmin(mw))
        vv, uv, uu = w @ mw, mw[t], m[t, t]
        denom = vv - 2 * uv + uu
        if denom <= tol:
            break
        gamma = float(((vv - uv) / denom).clamp(0.0, 1.0))
        if gamma <= tol:
            break
        w = (1 - gamma) * w
        w[t] += gamma
    return w.to(device=grads.device, dtype=grads.dtype)


def ae_kd_weights(zs: list[torch.Tensor], student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K): the min-norm weights of the teachers' gradients (p_s - p_k) / tau, the same for every row."""
    ps = F.softmax(student_logits.detach().float() / temperature, 1)
    grads = torch.stack([((ps - F.softmax(z.float() / temperature, 1)) / temperature).flatten() for z in zs])
    return min_norm_weights(grads).unsqueeze(0).expand(student_logits.shape[0], -1)


def teacher_weights(mode: str, zs: list[torch.Tensor], temperature: float, labels: torch.Tensor | None = None,
                    student_logits: torch.Tensor | None = None, fixed: list[float] | None = None) -> torch.Tensor:
    """(B, K) weights of `mode` (any of mean_prob, weighted, ca_mkd, entropy, ae_kd); `fixed`: weighted's."""
    b, k = zs[0].shape[0], len(zs)
    with torch.no_grad():
        if mode == "mean_prob":
            return torch.full((b, k), 1.0 / k, device=zs[0].device)
        if mode == "weighted":
            return torch.tensor(fixed, device=zs[0].device).unsqueeze(0).expand(b, -1)
        if mode == "ca_mkd":
            return ca_mkd_weights(zs, labels)
        if mode == "entropy":
            return entropy_weights(zs)
        if mode == "ae_kd":
            return ae_kd_weights(zs, student_logits, temperature)
    raise ValueError(f"unknown ensemble {mode!r}")
