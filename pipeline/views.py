"""Replayable training views: a view is a pure function of (dataset seed, sample id, view id).

Its parameters are a small record (crop offset `ox`, `oy` into the padded image and a `flip` bit)
that the cache stores per row, so the exact pixels can be rebuilt later with `apply_views`.
Everything is vectorised over a batch: a per-sample Python crop loop is slow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class ViewPolicy:
    """Pad by `pad` pixels (zeros), crop back to the original size at a random offset, maybe flip."""

    pad: int
    flip: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser: a well-mixed 64-bit hash, wrapping arithmetic on uint64 arrays.
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        return x ^ (x >> np.uint64(31))


def view_hash(seed: int, sample_ids, view_ids) -> np.ndarray:
    """A 64-bit hash per (seed, sample id, view id); broadcasts sample_ids against view_ids."""
    s = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    v = np.asarray(view_ids, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(np.full(np.broadcast(s, v).shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
    h = _splitmix64(h ^ s)
    return _splitmix64(h ^ v)


def view_params(seed: int, sample_ids, view_ids, policy: ViewPolicy) -> dict[str, np.ndarray]:
    """The view record of each (sample, view): {'ox', 'oy': int16 crop offsets, 'flip': bool}."""
    h = view_hash(seed, sample_ids, view_ids)
    span = np.uint64(2 * policy.pad + 1)
    ox = (h % span).astype(np.int16)
    oy = ((h >> np.uint64(21)) % span).astype(np.int16)
    flip = ((h >> np.uint64(42)) & np.uint64(1)).astype(bool) if policy.flip else np.zeros(h.shape, bool)
    return {"ox": ox, "oy": oy, "flip": flip}


def apply_views(images: np.ndarray, ox, oy, flip, pad: int) -> np.ndarray:
    """Replay view records on a batch of uint8 images (B, H, W, C) -> (B, H, W, C), same dtype."""
    images = np.asarray(images)
    b, h, w = images.shape[:3]
    ox = np.asarray(ox, dtype=np.int64).reshape(b)
    oy = np.asarray(oy, dtype=np.int64).reshape(b)
    flip = np.asarray(flip, dtype=bool).reshape(b)
    if pad == 0 and not flip.any():
        return images.copy()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else images
    rows = oy[:, None] + np.arange(h)[None, :]  # (B, H)
    cols = np.arange(w)[None, :]
    cols = np.where(flip[:, None], w - 1 - cols, cols) + ox[:, None]  # (B, W): flip after the crop
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def make_views(images: np.ndarray, sample_ids, view_ids, seed: int, policy: ViewPolicy):
    """Draw the view record of each (sample, view) and render it: returns (pixels, record)."""
    rec = view_params(seed, sample_ids, view_ids, policy)
    return apply_views(images, rec["ox"], rec["oy"], rec["flip"], policy.pad), rec
