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

from raykd.methods.ensemble import PER_SAMPLE, mix_logits, teacher_weights
from raykd.pipeline.core.registry import Registry

METHODS: Registry = Registry("method")


@dataclass
class MethodContext:
    """What a method may know when it is built: classes, teachers (with their val accuracy), epochs."""

    num_classes: int
    teachers: list[str]
    teacher_val_acc: dict[str, float] = field(default_factory=dict)
    epochs: int = 1
    student_stages: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    teacher_stages: dict[str, dict[str, tuple[int, int, int]]] = field(default_factory=dict)


@dataclass
class Targets:
    """One batch's teacher outputs, float32 on the training device: `logits[teacher]` is (B, C);
    `refined` (B, C) the professor's refined logits, when the method asks for them; `features[teacher]
    [stage]` (B, C, H, W) the feature maps the method asks for (`Method.feature_layers`), dequantised."""

    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    refined: torch.Tensor | None = None
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def label_mix(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau * log((softmax(z / tau) + onehot(y)) / 2): the target half teacher, half label."""
    p = F.softmax(z / temperature, 1)
    mixed = 0.5 * (p + F.one_hot(labels, z.shape[1]).to(p.dtype))
    return temperature * mixed.clamp_min(1e-30).log()


class Method(nn.Module, metaclass=ABCMeta):
    """Base class. `uses_teachers = False` for methods that need no teacher output (the CE baseline)."""

    uses_teachers = True
    # this method's own options, `method.<name>.*`: a raykd.pipeline.core.schema.Section subclass declared in the
    # method's file (config builds method.<name> from it); None = no options of its own
    Options = None
    # bump when a change to the method's maths makes its earlier students stale: it enters the students'
    # fingerprints (from 2 on, so version-1 students keep theirs), and a rerun trains them again
    version = 1

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.logged: dict[str, torch.Tensor] = {}  # per-step values to log beside the loss terms (the weights)

    uses_logits = True  # False for feature-only methods (FEED): no logits column is read

    def feature_layers(self) -> dict[str, list[str]]:
        """Teacher -> stages whose feature maps this method needs (cache columns feat.<teacher>.<stage>)."""
        return {}

    def columns(self) -> list[str]:
        """What this method reads besides the view and its label, named as `raykd.pipeline.cache.columns` does:
        `logits.<teacher>` (the cache serves them from its full logits or rebuilds them from its top-k),
        feature maps (the reader adds their int8 `.scale`), `refined`."""
        import raykd.pipeline.cache.columns as C

        if not self.uses_teachers:
            return []
        cols = [C.logits(t) for t in self.ctx.teachers] if self.cfg.targets != "refined" and self.uses_logits else []
        cols += [C.feat(t, s) for t, stages in self.feature_layers().items() for s in stages]
        return cols + ([C.REFINED] if self.cfg.targets in ("refined", "both") else [])

    # ---- hooks of the driver (`raykd distill`): the driver names no method

    @classmethod
    def chain(cls, cfg, name: str) -> list[dict]:
        """The students this method trains for one config, in turn, each as config changes (`{}`: the config
        as it is); a student of the chain starts when the one before it has finished. `name` is the
        student's name. Sequential FEED's generations are such a chain."""
        return [{}]

    @classmethod
    def student_teacher(cls, cfg) -> str | None:
        """A finished student to distil from instead of the cached teachers (run in the workers), if any."""
        return None

    @classmethod
    def summarise(cls, records: list[dict], out_dir: str) -> dict:
        """The record of a whole chain, from its students' records (`out_dir`: the last one's folder)."""
        return records[-1]

    @classmethod
    def notes(cls, record: dict) -> list[str]:
        """Lines the results table prints under its rows for this student."""
        return []

    def param_groups(self) -> list[dict]:
        """The method's own parameters as optimiser groups, each {"params": [...], "lr_factor": f}: a group
        trains at f times the student's learning rate (and schedule). Default: one group at the student's."""
        return [{"params": list(self.parameters())}]

    def export(self, student: nn.Module, out_dir: str, splits, files: dict) -> dict:
        """After training (the student and this method hold the trained weights): write what the method
        deploys besides the student into `out_dir`, add the files' sha256 to `files`, return record entries."""
        return {}

    @abstractmethod
    def forward(self, logits: torch.Tensor, stages: dict[str, torch.Tensor], targets: Targets, labels: torch.Tensor,
                epoch: int) -> dict[str, torch.Tensor]:
        """`epoch` counts from 1. Returns {"loss": total, <term>: value, ...}."""

    def teacher_weights(self) -> dict[str, float]:
        """Per-teacher weights of `method.ensemble=weighted` (normalised): fixed, or from validation accuracy
        (proportional, or softmax(acc / T) with `method.weight_temperature`)."""
        w = self.cfg.teacher_weights
        if w is None or w == "val_acc":
            acc = torch.tensor([self.ctx.teacher_val_acc.get(t, 1.0) for t in self.ctx.teachers], dtype=torch.float64)
            t = self.cfg.weight_temperature
            v = torch.softmax(acc / t, 0) if t is not None else acc / acc.sum()
            return dict(zip(self.ctx.teachers, v.tolist()))
        total = sum(w[t] for t in self.ctx.teachers)
        return {t: w[t] / total for t in self.ctx.teachers}

    def soft_target(self, targets: Targets, temperature: float, labels: torch.Tensor | None = None,
                    student: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The teachers' logits to distil from, per `method.ensemble` (methods/ensemble.py): one mixture for
        mean_prob, weighted, ca_mkd, entropy and ae_kd (`labels` for ca_mkd, the `student`'s logits being
        distilled for ae_kd), the mean logits for mean_logit, every teacher's own for per_teacher. The
        weights of a mixture that is not uniform are logged: w.<teacher> (batch mean), w_sd.<teacher>
        (the spread over the batch's samples)."""
        zs = [targets.logits[t].detach() for t in self.ctx.teachers]  # teachers are frozen
        mode = self.cfg.ensemble
        if mode == "per_teacher" or len(zs) == 1:
            return zs
        if mode == "mean_logit":
            return [torch.stack(zs).mean(0)]
        fixed = None
        if mode == "weighted":
            tw = self.teacher_weights()
            fixed = [tw[t] for t in self.ctx.teachers]
        w = teacher_weights(mode, zs, temperature, labels, student, fixed, self.cfg.ae_kd_cap)
        if mode != "mean_prob":
            for i, t in enumerate(self.ctx.teachers):
                self.logged[f"w.{t}"] = w[:, i].mean()
                self.logged[f"w_sd.{t}"] = w[:, i].std(unbiased=False)
        return [mix_logits(zs, temperature, w)]

    def soft_targets(self, targets: Targets, temperature: float, labels: torch.Tensor | None = None,
                     student: torch.Tensor | None = None) -> list[tuple[float, torch.Tensor]]:
        """(weight, logits) pairs whose weighted sum of losses is the method's distillation term, per
        `method.targets`: the teachers (split evenly over `per_teacher`), the professor's refined targets
        (`refined`, the `replace` strategy), both (`both`, the `combine` strategy, `method.combine`), or the
        teachers' target mixed half and half with the label (`label_mix`, a baseline for the professor).
        `labels` and the `student`'s logits reach the per-sample ensembles (ca_mkd, ae_kd)."""
        if self.cfg.ensemble in PER_SAMPLE and (labels is None or (student is None and self.cfg.ensemble == "ae_kd")):
            raise ValueError(f"ensemble {self.cfg.ensemble} needs the labels and the student's logits")
        out: list[tuple[float, torch.Tensor]] = []
        mode = self.cfg.targets
        if mode in ("teachers", "both", "label_mix"):
            zs = self.soft_target(targets, temperature, labels, student)
            if mode == "label_mix":
                zs = [label_mix(z, labels, temperature) for z in zs]
            w = self.cfg.combine.teachers if mode == "both" else 1.0
            out += [(w / len(zs), z) for z in zs]
        if mode in ("refined", "both"):
            w = 1.0 if mode == "refined" else self.cfg.combine.professor
            out.append((w, targets.refined.detach()))
        return out


def build_method(cfg, ctx: MethodContext) -> Method:
    """`cfg` is the config's `method` section; the class is looked up by `cfg.name`."""
    return METHODS.get(cfg.name)(cfg, ctx)
