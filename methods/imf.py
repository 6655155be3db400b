"""IMF — integrating matched features with attentive logits (Kim, Lee & Woo, IJCAI 2023; abstract only).

Paper: intermediate feature distillers (IFD) are branches on student blocks, trained from the teacher;
their outputs are combined by an attentive logit; at inference only the first student blocks and the
trained IFDs are used, with no more parameters than the student. A secondary source: an IFD block is
depthwise 3x3 conv -> pointwise 1x1 conv -> BN -> ReLU; the attentive logit adds C parameters per IFD;
two loss weights alpha, beta searched over {10, 20, 30, 40, ...}.
Our reading (each a `method.imf.*` option):
- IFD_k reads the output of student stage k (default: every stage but the last, at most the last two
  of them), two IFD blocks (the first with the stride that brings the map to the matched teacher
  stage's size, the second keeping it), then global average pooling and a linear head -> branch
  logits z_k. Width (`method.imf.width`): `student` (default) gives the IFD the channels of the student
  stage after k, and a 1x1 connector, used in training only, maps it to the teacher stage's channels
  for the feature loss; `teacher` gives the IFD the teacher's channels (no connector), which makes the
  inference model larger than a narrow student (cnn4 under resnet20: 3,200 vs 1,702 parameters). Matched teacher stage: the stage of the same name when the
  teacher has it (`teacher_layers` overrides), of one teacher (`method.imf.teacher`, default the first).
- Attentive logit: a learnable a_k in R^C per IFD (zero-initialised, i.e. a plain mean at the start),
  z_att,c = sum_k softmax_k(a_{.,c})_k * z_k,c.
- L = CE(z_att, y) + CE(z_s, y) + alpha * sum_k D(IFD_k(F_s,k), F_t,m(k)) + beta * tau^2 *
  KL(p_t^tau || p_att^tau), alpha = beta = 10; D the squared distance between the channels' spatial maps,
  each L2-normalised, summed over positions and averaged over channels (in [0, 4] whatever the map
  size: the attention-transfer convention of comparing unit maps), the larger map average-pooled to
  the smaller; p_t the teachers' target as in KD (`method.ensemble`, `targets`). (A mean over positions
  would scale as 1 / (H W) and leave the term too small to train: docs/methods.md, *Earlier readings*.)
- The inference model (`IMFInference`): the student's stages up to the deepest IFD, the IFDs, their
  heads and the attention weights; its output is z_att.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.methods.feed import match_size
from raykd.methods.kd import kd_loss
from raykd.pipeline.core.schema import Section


def ifd_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """depthwise 3x3 (stride) -> pointwise 1x1 -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class IFD(nn.Module):
    """Two IFD blocks from a student map (c_s, h_s) to the matched teacher map's channels and size."""

    def __init__(self, c_s: int, h_s: int, c_t: int, h_t: int, num_classes: int):
        super().__init__()
        stride = max(1, h_s // h_t)
        self.body = nn.Sequential(ifd_block(c_s, c_t, stride), ifd_block(c_t, c_t, 1))
        self.head = nn.Linear(c_t, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return f, self.head(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def attentive_logit(branch_logits: list[torch.Tensor], attention: torch.Tensor) -> torch.Tensor:
    """z_att,c = sum_k softmax over k of attention[k, c] * z_k,c; attention is (K, C)."""
    w = torch.softmax(attention, dim=0)  # (K, C)
    return (torch.stack(branch_logits) * w[:, None, :]).sum(0)


def channel_normalised_distance(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """|| n(s_c) - n(t_c) ||^2 summed over the positions, averaged over channels and the batch, n() the L2
    normalisation of one channel's spatial map (teacher detached). Each channel's term lies in [0, 4]
    whatever the map size; an element-wise mean (MSE) of the same unit vectors is that divided by H*W,
    which left the term ~1/196 of its size on a 14x14 map (version 1)."""
    s, t = match_size(student_map, teacher_map.detach())
    return (F.normalize(s.flatten(2), dim=2) - F.normalize(t.flatten(2), dim=2)).pow(2).sum(2).mean()


def _error(msg: str):
    from raykd.pipeline.core.errors import ConfigError

    return ConfigError(msg)


class IMFOptions(Section):
    """IMF: IFD branches on student stages matched to teacher stages, combined by an attentive logit."""

    alpha: float = Field(10.0, ge=0, description="weight of the matched-feature distance D")
    beta: float = Field(10.0, ge=0, description="weight of tau^2 KL(teacher || attentive logit)")
    temperature: float = Field(4.0, gt=0)
    student_layers: list[str] | None = Field(None, description="stages that get an IFD; None = the last two but the last")
    teacher: str | None = Field(None, description="the teacher whose stages are matched; None = the first distilled one")
    teacher_layers: dict[str, str] = Field(
        default_factory=dict, description="student stage -> teacher stage; default the stage of the same name")
    width: Literal["student", "teacher"] = Field(
        "student", description="IFD channels: the next student stage's (+ a training-only 1x1 connector) or the teacher's")





@METHODS.register("imf")
class IMF(Method):
    Options = IMFOptions
    version = 2  # 2: the feature term summed over positions (1: averaged, ~1/(H W) of it)

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        o = cfg.imf
        s_stages = ctx.student_stages
        names = list(s_stages)
        self.student_layers = list(o.student_layers or names[:-1][-2:])
        for s in self.student_layers:
            if s not in names[:-1]:
                raise _error(f"method.imf.student_layers: {s!r} is not a student stage before the last "
                             f"(stages: {', '.join(names)})")
        self.teacher = o.teacher or (ctx.teachers[0] if ctx.teachers else None)
        if self.teacher not in ctx.teachers:
            raise _error(f"method.imf.teacher={self.teacher!r} is not one of the distilled teachers {ctx.teachers}")
        if self.teacher not in ctx.teacher_stages:
            raise _error(f"method.imf.teacher={self.teacher!r} has no feature maps (a cache of the teachers' mean "
                         f"top-k only names its targets {self.teacher!r}): distil from a cache with per-teacher targets")
        t_stages = ctx.teacher_stages[self.teacher]
        self.matched: dict[str, str] = {}
        self.ifds = nn.ModuleDict()
        self.connectors = nn.ModuleDict()  # training only: IFD width -> teacher channels
        for s in self.student_layers:
            t = o.teacher_layers.get(s) or (s if s in t_stages else list(t_stages)[-1])
            if t not in t_stages:
                raise _error(f"method.imf.teacher_layers.{s}={t!r} is not a stage of teacher {self.teacher} "
                             f"(stages: {', '.join(t_stages)})")
            self.matched[s] = t
            (c_s, h_s, _), (c_t, h_t, _) = s_stages[s], t_stages[t]
            after = names[names.index(s) + 1]
            width = s_stages[after][0] if o.width == "student" else c_t
            self.ifds[s] = IFD(c_s, h_s, width, h_t, ctx.num_classes)
            self.connectors[s] = nn.Conv2d(width, c_t, 1, bias=False) if width != c_t else nn.Identity()
        self.attention = nn.Parameter(torch.zeros(len(self.student_layers), ctx.num_classes))

    def feature_layers(self) -> dict[str, list[str]]:
        return {self.teacher: list(dict.fromkeys(self.matched.values()))}

    def branches(self, stages: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = [self.ifds[s](stages[s]) for s in self.student_layers]
        return [f for f, _ in outs], [z for _, z in outs]

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.imf
        feats, zs = self.branches(stages)
        z_att = attentive_logit(zs, self.attention)
        ce_att, ce = F.cross_entropy(z_att, labels), F.cross_entropy(logits, labels)
        fmaps = targets.features[self.teacher]
        feat = sum(channel_normalised_distance(self.connectors[s](f), fmaps[self.matched[s]])
                   for f, s in zip(feats, self.student_layers))
        kd = sum(w * kd_loss(z_att, z, o.temperature) for w, z in self.soft_targets(targets, o.temperature, labels, z_att))
        return {"loss": ce_att + ce + o.alpha * feat + o.beta * kd, "ce_att": ce_att, "ce": ce, "feat": feat, "kd": kd}

    def export(self, student, out_dir, splits, files):
        """The deployed model (student stages up to the deepest IFD + IFDs + heads + attention) saved as
        inference.safetensors, with its parameters, FLOPs and test accuracy next to the full student's."""
        import os

        from raykd.pipeline.harness.training import evaluate
        from raykd.pipeline.models.checkpoints import save_state_dict

        inf = IMFInference(student, self).eval()
        files["inference.safetensors"] = save_state_dict(inf.state_dict(), os.path.join(out_dir, "inference.safetensors"))
        x = torch.zeros(1, splits.in_chans, splits.image_size, splits.image_size)
        test = (splits.test.images, splits.test.labels)
        with torch.no_grad():
            acc, _ = evaluate(inf, *test, splits.mean, splits.std, "cpu")
            student_acc, _ = evaluate(student, *test, splits.mean, splits.std, "cpu")
        return {"inference": {
            "stages": list(inf.stages), "ifd_layers": inf.student_layers, "params": inf.num_params(),
            "flops": flops(inf, x), "test_acc": acc, "student_params": student.num_params(),
            "student_flops": flops(student, x), "student_test_acc": student_acc}}

    @classmethod
    def notes(cls, record):
        if "inference" not in record:
            return []
        i = record["inference"]
        return [f"{record['name']}: IMF inference model ({' + '.join(i['stages'])} + IFDs on "
                f"{', '.join(i['ifd_layers'])}) {i['params']:,} params, {i['flops']:,} FLOPs, test "
                f"{100 * i['test_acc']:.2f}%; full student {i['student_params']:,} params, "
                f"{i['student_flops']:,} FLOPs, test {100 * i['student_test_acc']:.2f}%"]


class IMFInference(nn.Module):
    """The deployed IMF model: the student's stages up to the deepest IFD, the IFDs, heads and attention.
    Built from the trained student and method; `forward(x)` returns the attentive logit."""

    def __init__(self, student: nn.Module, method: IMF):
        super().__init__()
        names = list(student.stages)
        deepest = max(names.index(s) for s in method.student_layers)
        self.stages = nn.ModuleDict({n: student.stages[n] for n in names[:deepest + 1]})
        self.student_layers = list(method.student_layers)
        self.ifds = method.ifds
        self.attention = method.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = {}
        for n, mod in self.stages.items():
            x = mod(x)
            maps[n] = x
        return attentive_logit([self.ifds[s](maps[s])[1] for s in self.student_layers], self.attention)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward pass (torch's own counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    return int(counter.get_total_flops())
