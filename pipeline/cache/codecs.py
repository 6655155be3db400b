"""How targets are stored compactly and read back: fp16 logits, int8 feature maps, top-k probabilities.

Top-k (FKD's soft labels, our reading for every logit method): a source's probabilities at tau,
p = softmax(z / tau), keep the k largest (fp16) and their classes (int16); the student rebuilds the
full distribution with the rest of the mass spread evenly over the other C - k classes, and hands
methods the logits z~ = tau * log p~, whose softmax at tau is p~ exactly (at another temperature t,
softmax(z~ / t) is p~ sharpened or flattened as the original would be, up to the flat tail).
"""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round(x / s), s = max|x| / 127 over the row's whole map."""
    flat = x.reshape(len(x), -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale.float()


def dequantize_int8(q, scale) -> torch.Tensor:
    q = torch.as_tensor(q)
    return q.float() * torch.as_tensor(scale, dtype=torch.float32).reshape(-1, *([1] * (q.dim() - 1)))


def topk_encode(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k probabilities as fp16, their classes as int16 (int32 beyond 32,767 classes)), largest first."""
    values, indices = probs.float().topk(k, dim=1)
    return values.half(), indices.to(torch.int16 if probs.shape[1] <= 32767 else torch.int32)


def topk_decode(values, indices, num_classes: int, temperature: float) -> torch.Tensor:
    """Logits (B, C) whose softmax at `temperature` is the stored top-k probabilities with the rest of the
    mass spread evenly over the other classes."""
    values = torch.as_tensor(values).float()
    indices = torch.as_tensor(indices).long()
    k = values.shape[1]
    rest = (1.0 - values.sum(1, keepdim=True)).clamp_min(0.0) / max(1, num_classes - k)
    p = rest.expand(-1, num_classes).clone()
    p.scatter_(1, indices, values)
    p = p / p.sum(1, keepdim=True)
    return temperature * p.clamp_min(1e-12).log()


def mean_probs(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """The teachers' mean probability at tau (the `ensemble` top-k source)."""
    return torch.stack([torch.softmax(z.float() / temperature, dim=1) for z in logits]).mean(0)
