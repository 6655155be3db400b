"""Replayable training views: a view is a pure function of (dataset seed, sample id, view id).

Its parameters are a small record that the cache stores per row, so the exact pixels can be rebuilt
later (`ViewPolicy.render`). Two policies:

- `pad_crop` (CIFAR style): the record is a crop offset `ox`, `oy` into the zero-padded image and a
  `flip` bit; rendering is vectorised over the batch (`apply_views`).
- `random_resized_crop` (ImageNet style, FKD's): the record is a box `x`, `y`, `w`, `h` in the source
  image and a `flip` bit, drawn as torchvision's `RandomResizedCrop.get_params` draws it (area share in
  `scale`, log-uniform aspect ratio in `ratio`, 10 attempts, then the central crop) but from the hash
  of (seed, sample id, view id) instead of a global RNG; rendered by torchvision's `resized_crop` to the
  output size (antialiased), one image at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class ViewPolicy:
    """`pad_crop`: pad by `pad` pixels (zeros), crop back to the original size at a random offset, maybe
    flip. `random_resized_crop`: a box of `scale` of the area and aspect ratio in `ratio`, resized to the
    image size, maybe flipped."""

    pad: int = 0
    flip: bool = False
    kind: str = "pad_crop"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.kind not in ("pad_crop", "random_resized_crop"):
            raise ValueError(f"unknown view policy {self.kind!r}")
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))

    def as_dict(self) -> dict:
        """pad_crop as it always was ({pad, flip}: fingerprints of earlier caches hold)."""
        d = asdict(self)
        if self.kind == "pad_crop":
            return {"pad": self.pad, "flip": self.flip}
        d.pop("pad")
        return {**d, "scale": list(self.scale), "ratio": list(self.ratio)}

    @property
    def record(self) -> tuple[str, ...]:
        """The record's fields (cache columns view_<field>)."""
        return ("ox", "oy", "flip") if self.kind == "pad_crop" else ("x", "y", "w", "h", "flip")

    def params(self, seed: int, sample_ids, view_ids, size: tuple[int, int]) -> dict[str, np.ndarray]:
        """The record of each (sample, view) for source images of `size` (H, W)."""
        if self.kind == "pad_crop":
            return view_params(seed, sample_ids, view_ids, self)
        return crop_params(seed, sample_ids, view_ids, self, size)

    def render(self, images: np.ndarray, rec: dict) -> np.ndarray:
        """Replay records on a batch of uint8 images (B, H, W, C) -> (B, H, W, C)."""
        if self.kind == "pad_crop":
            return apply_views(images, rec["ox"], rec["oy"], rec["flip"], self.pad)
        return apply_crops(images, rec["x"], rec["y"], rec["w"], rec["h"], rec["flip"])


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


def _unit(h: np.ndarray, field: int) -> np.ndarray:
    """The `field`-th 21-bit slice of a hash as a float in [0, 1)."""
    return ((h >> np.uint64(21 * field)) & np.uint64(0x1FFFFF)).astype(np.float64) / float(1 << 21)


def crop_params(seed: int, sample_ids, view_ids, policy: ViewPolicy, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """RandomResizedCrop boxes {'x', 'y', 'w', 'h': int16, 'flip': bool}, vectorised: torchvision's
    draw (get_params) with the view hash as its random source."""
    H, W = size
    h0 = view_hash(seed, sample_ids, view_ids)
    shape = h0.shape
    area = float(H * W)
    lo, hi = np.log(policy.ratio[0]), np.log(policy.ratio[1])
    bw, bh = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    done = np.zeros(shape, bool)
    for attempt in range(10):
        ha = _splitmix64(h0 ^ np.uint64(0x632BE59BD9B4E019 * (attempt + 1) & 0xFFFFFFFFFFFFFFFF))
        target = area * (policy.scale[0] + (policy.scale[1] - policy.scale[0]) * _unit(ha, 0))
        aspect = np.exp(lo + (hi - lo) * _unit(ha, 1))
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        ok = ~done & (w > 0) & (w <= W) & (h > 0) & (h <= H)
        bw, bh, done = np.where(ok, w, bw), np.where(ok, h, bh), done | ok
    # fallback, as torchvision: the central crop at the nearest allowed ratio
    in_ratio = W / H
    if in_ratio < min(policy.ratio):
        fw, fh = W, int(round(W / min(policy.ratio)))
    elif in_ratio > max(policy.ratio):
        fw, fh = int(round(H * max(policy.ratio))), H
    else:
        fw, fh = W, H
    hp = _splitmix64(h0 ^ np.uint64(0x3C6EF372FE94F82B))
    x = np.where(done, np.floor(_unit(hp, 0) * (W - bw + 1)), (W - fw) // 2).astype(np.int16)
    y = np.where(done, np.floor(_unit(hp, 1) * (H - bh + 1)), (H - fh) // 2).astype(np.int16)
    flip = ((hp >> np.uint64(63)) & np.uint64(1)).astype(bool) if policy.flip else np.zeros(shape, bool)
    return {"x": x, "y": y, "w": np.where(done, bw, fw).astype(np.int16), "h": np.where(done, bh, fh).astype(np.int16),
            "flip": flip}


def apply_crops(images: np.ndarray, x, y, w, h, flip, size: tuple[int, int] | None = None) -> np.ndarray:
    """Replay crop records: each box resized to `size` (default the images' own) with torchvision's
    antialiased `resized_crop`, then flipped; uint8 (B, H, W, C) in and out."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    images = np.asarray(images)
    size = size or images.shape[1:3]
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = np.empty((len(images), size[0], size[1], images.shape[3]), np.uint8)
    for i in range(len(images)):
        v = TF.resized_crop(t[i], int(y[i]), int(x[i]), int(h[i]), int(w[i]), list(size), antialias=True)
        if flip[i]:
            v = TF.horizontal_flip(v)
        out[i] = v.permute(1, 2, 0).numpy()
    return out


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
    rec = policy.params(seed, sample_ids, view_ids, np.asarray(images).shape[1:3])
    return policy.render(images, rec), rec
