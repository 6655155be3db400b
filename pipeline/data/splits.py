"""A data set as the stages see it: `load_splits` turns a registered loader's raw arrays (or streamed
files) into the seeded train / val / test `Splits` with stable sample ids, the normalisation (measured
once per fingerprint, or given) and the data fingerprint that every cache and record is keyed by.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from raykd.pipeline.core.errors import DataError, RaykdError
from raykd.pipeline.core.log import log
from raykd.pipeline.core.records import DataStats, load_record, write_record
from raykd.pipeline.data.datasets import DATASETS, FileImages, cache_home, chunks, take
from raykd.pipeline.data.views import ViewPolicy


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, or FileImages (decoded on demand)
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) int64: index in the source training set (test: index in the test set)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    policy: ViewPolicy
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    fingerprint: str = ""

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[3]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]




def load_splits(data_cfg) -> Splits:
    """Load `data_cfg.name` and carve the seeded val (and, if the dataset has none, test) split from train."""
    extra = {"in_memory": data_cfg.in_memory} if data_cfg.name == "imagefolder" else {}
    raw = DATASETS.get(data_cfg.name)(data_cfg.root, data_cfg.image_size, **extra)
    rng = np.random.default_rng(data_cfg.seed)
    n = len(raw.train_y)
    perm = rng.permutation(n)
    if raw.test_x is None:
        n_test = max(1, int(round(n * data_cfg.test_fraction)))
        test = Split(take(raw.train_x, perm[:n_test]), raw.train_y[perm[:n_test]], perm[:n_test].astype(np.int64))
        perm = perm[n_test:]
    else:
        test = Split(raw.test_x, raw.test_y, np.arange(len(raw.test_y), dtype=np.int64))
    if data_cfg.test_subset is not None and data_cfg.test_subset < len(test):
        keep = np.sort(np.random.default_rng(data_cfg.seed + 1).permutation(len(test))[: data_cfg.test_subset])
        test = Split(take(test.images, keep), test.labels[keep], test.ids[keep])
    n_val = max(1, int(round(len(perm) * data_cfg.val_fraction)))
    val_ids, train_ids = np.sort(perm[:n_val]), perm[n_val:]
    if data_cfg.train_subset is not None:
        train_ids = train_ids[: data_cfg.train_subset]
    train_ids = np.sort(train_ids)
    if len(train_ids) == 0:
        raise DataError(f"{data_cfg.name}: no training samples left after the val/test split")
    train = Split(take(raw.train_x, train_ids), raw.train_y[train_ids], train_ids.astype(np.int64))
    val = Split(take(raw.train_x, val_ids), raw.train_y[val_ids], val_ids.astype(np.int64))
    policy = ViewPolicy(
        pad=raw.policy.pad if data_cfg.pad is None else data_cfg.pad,
        flip=raw.policy.flip if data_cfg.flip is None else data_cfg.flip,
        **({"kind": "random_resized_crop", "scale": tuple(data_cfg.crop_scale), "ratio": tuple(data_cfg.crop_ratio)}
           if data_cfg.view_policy == "random_resized_crop" else {}),
    )
    splits = Splits(data_cfg.name, train, val, test, raw.num_classes, policy)
    splits.fingerprint = _fingerprint(splits, data_cfg)
    if data_cfg.mean is not None and data_cfg.std is not None:
        if len(data_cfg.mean) != splits.in_chans or len(data_cfg.std) != splits.in_chans:
            raise DataError(f"data.mean/std: one value per channel ({splits.in_chans})")
        splits.mean, splits.std = tuple(data_cfg.mean), tuple(data_cfg.std)
    else:
        splits.mean, splits.std = _stats(train.images, splits.fingerprint)
    return splits


def _stats(images, fingerprint: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1], in one pass of 1024-image chunks
    (float64 sums: no full-size float copy). A streamed folder's are kept under the raykd cache by the
    data fingerprint, so only the first stage that loads it decodes every image for them."""
    path = os.path.join(cache_home(), "stats", f"{fingerprint}.json") if isinstance(images, FileImages) else None
    if path and os.path.isfile(path):
        try:
            d = load_record(path, DataStats, "record of image statistics")
        except RaykdError as e:  # a cache of our own: measured again, and written over
            log.warning(f"[data] {e}; measuring the statistics again")
        else:
            if len(d["mean"]) == len(d["std"]) == images.shape[3]:
                return tuple(d["mean"]), tuple(d["std"])
    c = images.shape[3]
    n, s1, s2 = 0, np.zeros(c), np.zeros(c)
    for _, batch in chunks(images):
        x = batch.reshape(-1, c).astype(np.float64) / 255.0
        n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + np.square(x).sum(0)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    out = tuple(float(m) for m in mean), tuple(float(max(v, 1e-3)) for v in std)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_record(path, {"mean": out[0], "std": out[1]}, indent=None)
    return out


def _fingerprint(s: Splits, data_cfg) -> str:
    h = hashlib.sha256()
    h.update(repr((s.name, data_cfg.seed, s.policy.as_dict(), s.num_classes)).encode())
    if data_cfg.mean is not None:  # a given normalisation is part of what the models see
        h.update(repr((tuple(data_cfg.mean), tuple(data_cfg.std))).encode())
    for part in (s.train, s.val, s.test):
        h.update(part.ids.tobytes())
        h.update(part.labels.tobytes())
        if isinstance(part.images, FileImages):  # the files (path, size, mtime) and the decoded size
            h.update(repr(part.images.size).encode())
            shards: dict[str, str] = {}  # a shard member's: its shard's, looked up once
            for p in part.images.paths:
                if "::" in p:
                    shard = p.split("::", 1)[1]
                    if shard not in shards:
                        shards[shard] = _url_id(shard)
                    h.update(f"{p}\0{shards[shard]}\n".encode())
                    continue
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:  # the sha256 of all the pixels, as before (fed in chunks)
            inner = hashlib.sha256()
            for _, batch in chunks(part.images, 8192):
                inner.update(np.ascontiguousarray(batch).tobytes())
            h.update(inner.digest())
    return h.hexdigest()


def _url_id(url: str) -> str:
    """A stored file's size and version (mtime, or an object store's ETag / LastModified)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return repr((info.get("size"), info.get("mtime"), info.get("ETag"), str(info.get("LastModified"))))
