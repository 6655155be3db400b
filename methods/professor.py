"""Professor — "Distilling from professors: enhancing the knowledge distillation of teachers" (Information
Sciences 576, 2021; abstract only): a CAAE refiner of the teachers' soft targets.

Paper (abstract): a professor model refines the teacher's soft target so that it is (1) more accurate
and (2) faithful to the teacher's inter-class correlations; it is built by reformulating a
conditional adversarial autoencoder (CAAE); two KD strategies use both teacher and professor; the
professor is model-agnostic and combines with any KD method.

A loss of KL(q || softmax r) + CE(r, y) on every sample is minimised per sample by (q + e_y) / 2, the
teachers' distribution mixed with the label (our first reading: docs/methods.md, *Earlier readings*);
that mix is a baseline of its own (`method.targets: label_mix`) the professor must beat.

Our reading now (each a `professor` option):
- q = the teachers' probabilities at tau (`temperature`), combined per `professor.ensemble`
  (mean_prob, or per sample ca_mkd / entropy, methods/ensemble.py);
- encoder E: log q -> z, a latent narrower than the classes (`latent_dim`, default C // 2);
  generator G(z, onehot(y)) -> refined logits r;
- reconstruction only where the teachers are right: L_rec = KL(q || softmax r) averaged over the
  samples with argmax q = y. There G must rebuild q from (z, y); its optimum is r = log q, so a
  correct target is kept, not mixed with the label;
- a latent discriminator D_z on (z, y) against (N(0, I), y) (`w_z`): z is pushed to the same prior
  for every class, i.e. to carry the target's shape (confidence, which classes it confuses) and not
  its class, which G takes from y;
- an output discriminator D_q on (p, y): real = (q, y) of the samples the teachers got right, fake =
  (softmax r, y) of every sample (`w_q`). On the samples the teachers got wrong nothing else acts, so
  G(E(q), y) is pushed to look like a correct target of class y with the shape q had — the wrong
  part of q replaced, not averaged with e_y;
- `w_cls` (default 0) can add CE(r, y); any w_cls > 0 moves the optimum back towards the label mix.
- inference is deterministic, z = E(q); the cache's `refined` column holds tau * r, so that a
  student's softmax(refined / tau) is exactly softmax(r). What it did is measured on held-out samples
  (`holdout`, excluded from training): accuracy, distance to the label mix, entropy and the
  correlation of the non-target probabilities with the teachers' (pipeline/stages/professor.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raykd.methods.ensemble import mix_logits, teacher_weights


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, o))


def latent_size(num_classes: int, latent_dim: int | None) -> int:
    """The latent width: `latent_dim`, default C // 2 (at least 1); never as wide as the classes."""
    d = latent_dim if latent_dim is not None else max(1, num_classes // 2)
    if d >= num_classes:
        from raykd.pipeline.core.errors import ConfigError

        raise ConfigError(f"professor.latent_dim={d} must be narrower than the {num_classes} classes: a latent as "
                          f"wide as q can copy it, label included")
    return d


def teacher_probs(teacher_logits: list[torch.Tensor], labels: torch.Tensor, temperature: float,
                  ensemble: str = "mean_prob") -> torch.Tensor:
    """q: the teachers' probabilities at `temperature`, combined per `ensemble` (methods/ensemble.py)."""
    zs = [z.float() for z in teacher_logits]
    if len(zs) == 1:
        return F.softmax(zs[0] / temperature, 1)
    w = teacher_weights(ensemble, zs, temperature, labels)
    return F.softmax(mix_logits(zs, temperature, w) / temperature, 1)


class Professor(nn.Module):
    """E, G (the refiner) and D_z, D_q (only for training)."""

    def __init__(self, num_classes: int, latent_dim: int | None = None, hidden: int = 64, temperature: float = 4.0,
                 ensemble: str = "mean_prob"):
        super().__init__()
        self.num_classes, self.temperature, self.ensemble = num_classes, temperature, ensemble
        d = latent_size(num_classes, latent_dim)
        self.encoder = _mlp(num_classes, hidden, d)
        self.decoder = _mlp(d + num_classes, hidden, num_classes)
        self.d_z = _mlp(d + num_classes, hidden, 1)
        self.d_q = _mlp(2 * num_classes, hidden, 1)

    def generator_parameters(self):
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def discriminator_parameters(self):
        return [*self.d_z.parameters(), *self.d_q.parameters()]

    def teacher_probs(self, teacher_logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """q: the teachers' probabilities at tau, combined per `ensemble`."""
        return teacher_probs(teacher_logits, labels, self.temperature, self.ensemble)

    def forward(self, q: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent z, refined logits r) for teacher probabilities q and labels."""
        z = self.encoder(q.clamp_min(1e-8).log())
        r = self.decoder(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1))
        return z, r

    @torch.no_grad()
    def refine(self, teacher_logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The `refined` column: tau * r, so softmax(refined / tau) = softmax(r)."""
        return self.temperature * self(self.teacher_probs(teacher_logits, labels), labels)[1]


def _bce(logits: torch.Tensor, real: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy against all-real or all-fake; with `weight` (B,) a masked mean (no host sync)."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none").squeeze(1)
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


def professor_losses(prof: Professor, teacher_logits: list[torch.Tensor], labels: torch.Tensor, w_rec: float = 1.0,
                     w_cls: float = 0.0, w_z: float = 0.1, w_q: float = 0.1) -> tuple[dict, torch.Tensor]:
    """One batch: ({"loss": L_prof, rec, cls, adv_z, adv_q, refined_acc, fixed_acc}, discriminators' loss).
    `fixed_acc`: the share of the batch's teacher-wrong samples whose refined argmax is the label."""
    q = prof.teacher_probs(teacher_logits, labels)
    z, r = prof(q, labels)
    log_pr = F.log_softmax(r, 1)
    onehot = F.one_hot(labels, prof.num_classes).to(q.dtype)
    correct = (q.argmax(1) == labels).to(q.dtype)
    rec_per = (q * (q.clamp_min(1e-12).log() - log_pr)).sum(1)
    rec = (rec_per * correct).sum() / correct.sum().clamp_min(1.0)
    cls = F.cross_entropy(r, labels)
    p_r = log_pr.exp()
    adv_z = _bce(prof.d_z(torch.cat([z, onehot], 1)), True)
    adv_q = _bce(prof.d_q(torch.cat([p_r, onehot], 1)), True)
    loss = w_rec * rec + w_cls * cls + w_z * adv_z + w_q * adv_q
    # the discriminators see detached inputs: their loss trains them alone
    d_loss = (_bce(prof.d_z(torch.cat([torch.randn_like(z), onehot], 1)), True)
              + _bce(prof.d_z(torch.cat([z.detach(), onehot], 1)), False)
              + _bce(prof.d_q(torch.cat([p_r.detach(), onehot], 1)), False)
              + _bce(prof.d_q(torch.cat([q, onehot], 1)), True, correct))  # real: the targets the teachers got right
    hit = (r.argmax(1) == labels).to(q.dtype)
    wrong = 1 - correct
    terms = {"loss": loss, "rec": rec, "cls": cls, "adv_z": adv_z, "adv_q": adv_q, "refined_acc": hit.mean(),
             "fixed_acc": (hit * wrong).sum() / wrong.sum().clamp_min(1.0)}
    return terms, d_loss
