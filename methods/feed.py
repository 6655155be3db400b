"""FEED — feature-level ensemble knowledge distillation (Park & Kwak, ECAI 2020).

Paper (equations recovered from a secondary summary): L = CE(z_s, y) + beta * sum_n
|| x_t,n / ||x_t,n||_2 - NTL_n(x_s) / ||NTL_n(x_s)||_2 ||_1, with x_t,n teacher n's final feature map,
x_s the student's final feature map (before pooling), each flattened per sample; one non-linear
transformation NTL_n per teacher (three 3x3 convolutions), trained with the student and dropped at
test time; teachers frozen. Parallel FEED: all N teachers at once.
Our reading (each a `method.feed.*` option): the NTL is the paper's (`ntl: full`, default): three 3x3
convolutions C_s -> C_s -> C_t -> C_t, each followed by BN and LeakyReLU(0.1). The NTLs are dropped
after training, so their size costs nothing at test time (~108k parameters per 64-channel teacher
from cnn8's 32-channel map: much more than the student, but only while training). `ntl: bottleneck`
is our smaller alternative, 1x1 C_s -> b, 3x3 b -> b, 1x1 b -> C_t (b = `bottleneck`, 8): version 2
made it the default after test results were seen; version 3 returns to the paper. The student's
record gives the method's parameter count (`method_params`). A spatial mismatch is resolved by
adaptive average pooling of the larger map to the smaller size; the L1 norm is averaged over the
elements (and the batch); w_ce = 1; beta = 500 (the Factor Transfer default in its authors' code;
RepDistiller's FT uses 200): the feature term is an element mean of unit vectors, so its size depends
on the map's, and beta is a value to choose on validation for a new regime. The student's last stage
and each teacher's last stage by default.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from raykd.methods.base import METHODS, Method
from raykd.pipeline.core.schema import NAME_RE, Section


def ntl(c_in: int, c_out: int, negative_slope: float = 0.1, bottleneck: int | None = None) -> nn.Sequential:
    """[Conv -> BN -> LeakyReLU] x 3: channels c_in -> b -> b -> c_out with kernels 1, 3, 1 (`bottleneck` b),
    or the paper's three 3x3 convolutions c_in -> c_in -> c_out -> c_out (bottleneck None)."""
    if bottleneck is None:
        plan = [(c_in, c_in, 3), (c_in, c_out, 3), (c_out, c_out, 3)]
    else:
        plan = [(c_in, bottleneck, 1), (bottleneck, bottleneck, 3), (bottleneck, c_out, 1)]
    layers: list[nn.Module] = []
    for a, b, k in plan:
        layers += [nn.Conv2d(a, b, k, padding=k // 2, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(negative_slope)]
    return nn.Sequential(*layers)


def match_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller of their spatial sizes (adaptive average pooling of the larger)."""
    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    if a.shape[2:] != (h, w):
        a = F.adaptive_avg_pool2d(a, (h, w))
    if b.shape[2:] != (h, w):
        b = F.adaptive_avg_pool2d(b, (h, w))
    return a, b


def feed_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """mean | t/||t||_2 - s/||s||_2 | over elements and batch, each map flattened per sample. The teacher
    map is detached (teachers are frozen)."""
    s, t = match_size(student_map, teacher_map.detach())
    s = F.normalize(s.flatten(1), dim=1)
    t = F.normalize(t.flatten(1), dim=1)
    return (t - s).abs().mean()


class FEEDOptions(Section):
    """FEED: one non-linear transformation (NTL) per teacher from the student's final map to the teacher's."""

    beta: float = Field(500.0, ge=0, description="weight of the feature term (the Factor Transfer default)")
    w_ce: float = Field(1.0, ge=0)
    student_layer: str | None = Field(None, description="student stage the NTLs read; None = its last stage")
    teacher_layers: dict[str, str] = Field(
        default_factory=dict, description="teacher -> stage to match; a teacher not listed: its last stage")
    negative_slope: float = Field(0.1, ge=0, description="LeakyReLU slope inside the NTLs")
    ntl: Literal["bottleneck", "full"] = Field(
        "full", description="NTL shape: the paper's three 3x3, or 1x1 -> 3x3 -> 1x1 through `bottleneck` channels")
    bottleneck: int = Field(8, gt=0, description="channels inside a bottleneck NTL")
    generations: int = Field(1, ge=1, description="sequential FEED: generation g>1 distils from generation g-1's student")
    from_student: str | None = Field(
        None, pattern=NAME_RE, description="a finished student (<out_dir>/students/<name>) as the only teacher, run "
                                           "in the workers on the cached views; set by sequential FEED for g>1")


@METHODS.register("feed")
class FEED(Method):
    Options = FEEDOptions
    version = 3  # 3: the paper's NTLs by default again (2: bottleneck NTLs by default)

    uses_logits = False

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        o = cfg.feed
        if cfg.targets != "teachers":
            from raykd.pipeline.core.errors import ConfigError

            raise ConfigError(f"method.targets={cfg.targets}: FEED distils feature maps, not (refined) logits")
        stages = ctx.student_stages
        self.student_layer = o.student_layer or (list(stages)[-1] if stages else None)
        if self.student_layer not in stages:
            from raykd.pipeline.core.errors import ConfigError

            raise ConfigError(f"method.feed.student_layer={self.student_layer!r} is not a student stage "
                              f"(stages: {', '.join(stages)})")
        c_s = stages[self.student_layer][0]
        self.layers: dict[str, str] = {}
        self.ntls = nn.ModuleDict()
        for t in ctx.teachers:
            t_stages = ctx.teacher_stages[t]
            layer = o.teacher_layers.get(t) or list(t_stages)[-1]
            if layer not in t_stages:
                from raykd.pipeline.core.errors import ConfigError

                raise ConfigError(f"method.feed.teacher_layers.{t}={layer!r} is not a stage of teacher {t} "
                                  f"(stages: {', '.join(t_stages)})")
            self.layers[t] = layer
            self.ntls[t] = ntl(c_s, t_stages[layer][0], o.negative_slope, o.bottleneck if o.ntl == "bottleneck" else None)

    def feature_layers(self) -> dict[str, list[str]]:
        return {t: [layer] for t, layer in self.layers.items()}

    @classmethod
    def chain(cls, cfg, name):
        """Sequential FEED: generation 1 distils from the configured teachers, generation g > 1 from the
        frozen student of generation g - 1; every generation is an ordinary student, `<name>-g<g>`."""
        gens = cfg.method.feed.generations
        if gens == 1:
            return [{}]
        out = []
        for g in range(1, gens + 1):
            changes = {"method.feed.generations": 1, "distill.name": f"{name}-g{g}"}
            if g > 1:
                changes.update({"method.feed.from_student": f"{name}-g{g - 1}", "method.teachers": None})
            out.append(changes)
        return out

    @classmethod
    def student_teacher(cls, cfg):
        return cfg.method.feed.from_student

    @classmethod
    def summarise(cls, records, out_dir):
        """The last generation's record, with every generation's accuracy (also generations.json beside it)."""
        if len(records) == 1:
            return records[0]
        import json
        import os

        summary = [{"generation": g, "name": r["name"], "teachers": r["teachers"], "val_acc": r["val_acc"],
                    "test_acc": r["test_acc"]} for g, r in enumerate(records, 1)]
        tmp = os.path.join(out_dir, "generations.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"generations": summary}, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, "generations.json"))
        return {**records[-1], "generations": summary}

    @classmethod
    def notes(cls, record):
        return [f"{record['name']}: generation {g['generation']} ({g['name']}, from {', '.join(g['teachers'])}) "
                f"val {100 * g['val_acc']:.2f}% test {100 * g['test_acc']:.2f}%" for g in record.get("generations", [])]

    def forward(self, logits, stages, targets, labels, epoch):
        o = self.cfg.feed
        ce = F.cross_entropy(logits, labels)
        x_s = stages[self.student_layer]
        feat = sum(feed_loss(self.ntls[t](x_s), targets.features[t][layer]) for t, layer in self.layers.items())
        return {"loss": o.w_ce * ce + o.beta * feat, "ce": ce, "feed": feat}
