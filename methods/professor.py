"""Professor — a CAAE refiner of the teachers' soft targets (seed 001; full text unavailable, docs/methods.md).

Paper (abstract): a professor model refines the teacher's soft target so that it is (1) more accurate
and (2) faithful to the teacher's inter-class correlations; it is built by reformulating a
conditional adversarial autoencoder (CAAE); two KD strategies use both teacher and professor; the
professor is model-agnostic and combines with any KD method.
Our reading (each choice a `professor` config option, defaults from docs/methods.md):
- trained after the teachers, before any student, on the cached teacher outputs only (no teacher
  runs): q_t = the teachers' mean probability at tau (`temperature`);
- encoder E: q_t -> latent z (`latent_dim` 16); decoder G(z, onehot(y)) -> refined logits r;
  a latent discriminator D_z pushes z toward a N(0, I) prior; an output discriminator D_q tells
  (probabilities, label) pairs apart: real = q_t of samples the teachers classify correctly,
  fake = softmax(r);
- L_prof = w_rec KL(q_t || softmax(r)) + w_cls CE(r, y) + w_z adv_z + w_q adv_q (1, 1, 0.01, 0.01),
  non-saturating GAN losses; inference is deterministic, z = E(q_t);
- the cache's `refined` column holds tau * r, so that a student's softmax(refined / tau) is exactly
  the professor's softmax(r) at the same tau; the student strategies are `method.targets=refined`
  (replace) and `both` (combine, `method.combine` weights 0.5 / 0.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import ensemble_logits


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, o))


class Professor(nn.Module):
    """E, G (the refiner) and D_z, D_q (only for training)."""

    def __init__(self, num_classes: int, latent_dim: int = 16, hidden: int = 64, temperature: float = 4.0):
        super().__init__()
        self.num_classes, self.temperature = num_classes, temperature
        self.encoder = _mlp(num_classes, hidden, latent_dim)
        self.decoder = _mlp(latent_dim + num_classes, hidden, num_classes)
        self.d_z = _mlp(latent_dim, hidden, 1)
        self.d_q = _mlp(2 * num_classes, hidden, 1)

    def generator_parameters(self):
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def discriminator_parameters(self):
        return [*self.d_z.parameters(), *self.d_q.parameters()]

    def teacher_probs(self, teacher_logits: list[torch.Tensor]) -> torch.Tensor:
        """q_t: the teachers' mean probability at tau."""
        return F.softmax(ensemble_logits([z.float() for z in teacher_logits], self.temperature) / self.temperature, 1)

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent z, refined logits r) for teacher probabilities q and labels."""
        z = self.encoder(q)
        r = self.decoder(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1))
        return z, r

    @torch.no_grad()
    def refine(self, teacher_logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The `refined` column: tau * r, so softmax(refined / tau) = softmax(r)."""
        return self.temperature * self(self.teacher_probs(teacher_logits), labels)[1]


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def professor_losses(prof: Professor, teacher_logits: list[torch.Tensor], labels: torch.Tensor, w_rec: float = 1.0,
                     w_cls: float = 1.0, w_z: float = 0.01, w_q: float = 0.01) -> tuple[dict, torch.Tensor]:
    """One batch: ({"loss": L_prof, rec, cls, adv_z, adv_q, refined_acc}, discriminators' loss)."""
    q = prof.teacher_probs(teacher_logits)
    z, r = prof(q, labels)
    log_pr = F.log_softmax(r, 1)
    rec = (q * (q.clamp_min(1e-12).log() - log_pr)).sum(1).mean()
    cls = F.cross_entropy(r, labels)
    onehot = F.one_hot(labels, prof.num_classes).to(q.dtype)
    p_r = log_pr.exp()
    adv_z = _bce(prof.d_z(z), True)
    adv_q = _bce(prof.d_q(torch.cat([p_r, onehot], 1)), True)
    loss = w_rec * rec + w_cls * cls + w_z * adv_z + w_q * adv_q
    # the discriminators see detached inputs: their loss trains them alone
    correct = q.argmax(1) == labels
    d_loss = _bce(prof.d_z(torch.randn_like(z)), True) + _bce(prof.d_z(z.detach()), False)
    d_loss = d_loss + _bce(prof.d_q(torch.cat([p_r.detach(), onehot], 1)), False)
    # real pairs: the teacher targets the teachers got right (a masked mean: no host sync on the count)
    real = F.binary_cross_entropy_with_logits(prof.d_q(torch.cat([q, onehot], 1)), torch.ones_like(q[:, :1]),
                                              reduction="none").squeeze(1)
    w = correct.to(real.dtype)
    d_loss = d_loss + (real * w).sum() / w.sum().clamp_min(1.0)
    terms = {"loss": loss, "rec": rec, "cls": cls, "adv_z": adv_z, "adv_q": adv_q,
             "refined_acc": (r.argmax(1) == labels).float().mean()}
    return terms, d_loss
