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
  NeurIPS 2020, as its official code (AnTuo1998/AE-KD, helper/optimization.py) computes it: teacher k's
  KD gradient with respect to the student's logits, g_k = (p_s - p_k) / tau per sample, is averaged over
  the batch (one C-vector per teacher), and the weights are the min-norm point of their capped convex
  hull, min ||sum_k w_k g_k||^2 over {w : sum_k w_k = 1, 0 <= w_k <= C}, C = `method.ae_kd_cap` (0.6,
  the official default: its "tolerance for disagreement"). The official code solves that as a one-class
  nu-SVM on the Gram matrix with nu = 1 / (C K) (scikit-learn's OneClassSVM, precomputed kernel), the
  weights being the dual coefficients divided by nu K; so do we. The cap is an *upper* bound: without
  it the weights drift to whichever teachers sit nearest the student. One w per batch. Since sum_k w_k
  (p_s - p_k) = p_s - sum_k w_k p_k, the weighted sum of the teachers' KD gradients is KD's gradient
  towards the w-mixture of the teachers, which is how it is applied (to DKD and AEKT alike). The
  paper's feature-level term is left out.

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


def capped_min_norm_weights(grads: torch.Tensor, cap: float) -> torch.Tensor:
    """(K,) minimising || sum_k w_k grads[k] ||^2 over {sum_k w_k = 1, 0 <= w_k <= cap}, grads (K, D): the
    official AE-KD solver, a one-class nu-SVM on the Gram matrix with nu = 1 / (cap K), whose dual is
    min 1/2 a^T G a s.t. 0 <= a_k <= 1, sum_k a_k = nu K; w = a / (nu K). A cap below 1 / K is infeasible
    and is read as 1 / K (uniform weights), as the official code clamps nu to 1."""
    from sklearn.svm import OneClassSVM

    k = grads.shape[0]
    nu = max(1.0 / (cap * k), 1.0 / k)
    g = grads.double().cpu()
    gram = (g @ g.t()).numpy()
    w = torch.zeros(k, dtype=torch.float64)
    if nu >= 1.0 or not gram.any():  # only the uniform w is feasible, or every gradient is zero
        w += 1.0 / k
    else:
        svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6).fit(gram)
        w[torch.as_tensor(svm.support_)] = torch.as_tensor(svm.dual_coef_[0]) / (nu * k)
    return w.to(device=grads.device, dtype=grads.dtype)


def ae_kd_weights(zs: list[torch.Tensor], student_logits: torch.Tensor, temperature: float,
                  cap: float = 0.6) -> torch.Tensor:
    """(B, K): the capped min-norm weights of the teachers' batch-mean KD gradients (p_s - p_k) / tau, the
    same for every row."""
    ps = F.softmax(student_logits.detach().float() / temperature, 1)
    grads = torch.stack([((ps - F.softmax(z.float() / temperature, 1)) / temperature).mean(0) for z in zs])
    return capped_min_norm_weights(grads, cap).unsqueeze(0).expand(student_logits.shape[0], -1)


def teacher_weights(mode: str, zs: list[torch.Tensor], temperature: float, labels: torch.Tensor | None = None,
                    student_logits: torch.Tensor | None = None, fixed: list[float] | None = None,
                    cap: float = 0.6) -> torch.Tensor:
    """(B, K) weights of `mode` (any of mean_prob, weighted, ca_mkd, entropy, ae_kd); `fixed`: weighted's,
    `cap`: ae_kd's upper bound on a weight."""
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
            return ae_kd_weights(zs, student_logits, temperature, cap)
    raise ValueError(f"unknown ensemble {mode!r}")
