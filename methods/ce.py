"""CE — the baseline: cross-entropy on the labels, no teacher. Same loop, same views as every method."""

from __future__ import annotations

import torch.nn.functional as F

from raykd.methods.base import METHODS, Method


@METHODS.register("ce")
class CE(Method):
    uses_teachers = False

    def forward(self, logits, stages, targets, labels, epoch):
        ce = F.cross_entropy(logits, labels)
        return {"loss": ce, "ce": ce}
