"""An epoch's training batches, at memory speed when the data fit, streamed through Ray Data otherwise.

In memory (`distill.in_memory`: auto picks it when the job's views fit the budget): a worker reads its
share of a view once, with pyarrow, into tensors ready for training (pixels normalised, logits as
float32, the professor's column joined by sample id); every epoch that uses the view permutes the share
with a generator seeded by (seed, epoch) and batches it by indexing. Streamed: Ray Data's
`iter_torch_batches` over the view's Parquet files (a Ray Train shard when several workers split it),
with its local shuffle buffer, each batch prepared by the same function. Either way a worker sees the
same rows of the same views; only the order within an epoch differs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Iterator

import numpy as np
import torch

import raykd.pipeline.cache.columns as C
from raykd.pipeline.data.datasets import as_tensor, normalize
from raykd.pipeline.data.views import ViewPolicy, make_views

_ITEM_BYTES = {"uint8": 1, "int8": 1, "bool": 1, "int16": 2, "halffloat": 2, "int32": 4, "float": 4, "int64": 8,
               "double": 8}


def read_view(fs, files: list[str], columns: list[str], checks=None) -> dict[str, np.ndarray]:
    """The rows of a view's Parquet files (the given columns) as numpy arrays, ordered by sample id; each
    file checked against its sha256 in the manifest as it is read (`checks`, a cache.PartChecks)."""
    import pyarrow as pa

    from raykd.pipeline.cache.reader import column_array
    from raykd.pipeline.cache.storage import read_parquet_part

    t = pa.concat_tables([checks.read(fs, p, columns) if checks else read_parquet_part(fs, p, columns) for p in files])
    out = {c: column_array(t, c) for c in columns}
    order = np.argsort(out["sample_id"], kind="stable")
    return {c: v[order] for c, v in out.items()}


def worker_share(n: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Row positions of worker `rank` of `world`: a seeded partition of n rows, N // world each (so every
    worker takes the same number of steps), in row order. One worker: every row."""
    if world == 1:
        return np.arange(n)
    per = n // world
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[rank * per:(rank + 1) * per])


def row_bytes(manifest_columns: dict[str, str], columns: list[str]) -> int:
    """Bytes per row of `columns` once prepared for training (pixels as float32, logits as float32)."""
    total = 0
    for c in columns:
        t = manifest_columns.get(c, "int64")
        m = re.match(r"tensor<(\w+)>\[(.*)\]", t)
        if m:
            item, shape = m.group(1), [int(s) for s in m.group(2).split(",") if s.strip()]
            size = int(np.prod(shape))
        else:
            item, size = t, 1
        nbytes = _ITEM_BYTES.get(item, 8)
        if c in (C.PIXELS, C.REFINED):
            nbytes = 4  # normalised pixels, refined logits: float32
        total += size * nbytes
    return total


def memory_budget() -> int:
    """Bytes a job may hold as in-memory views: a quarter of the memory available now."""
    try:
        import psutil

        return int(psutil.virtual_memory().available // 4)
    except ImportError:
        return 2 << 30


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How raw view columns become training tensors: `x` (float32 NCHW, normalised), `y`, `sample_id`;
    targets as stored (fp16 logits, top-k, int8 or fp16 maps: a TargetReader and `to_device` decode them
    per batch), `refined` as float32. Without stored pixels, the view is rendered from the source images
    by its record."""

    mean: tuple
    std: tuple
    policy: dict | None = None  # ViewPolicy.as_dict(), only to replay views without pixels
    train: Any = None  # the training Split (or its object ref), only to replay views without pixels

    def prepare(self, raw: dict, defer: bool = False) -> dict[str, torch.Tensor]:
        """Rows as tensors. `defer`: views without stored pixels keep their records, and `render` makes
        `x` batch by batch (held in memory, a view is then its records, not its pixels)."""
        t = {k: as_tensor(v) for k, v in raw.items()}
        out = {"sample_id": t["sample_id"].long(), "y": t["label"].long()}
        if C.PIXELS in t:
            out["x"] = normalize(t[C.PIXELS], self.mean, self.std).contiguous()
        elif defer:
            out.update({C.record(k): t[C.record(k)] for k in ViewPolicy(**self.policy).record})
        else:
            out = self.render({**out, **{C.record(k): t[C.record(k)] for k in ViewPolicy(**self.policy).record}})
        for k, v in t.items():  # targets as stored (fp16 logits, top-k, int8 maps): compact in memory
            kind = C.parse(k).kind
            if k == C.REFINED:
                out[k] = v.float()
            elif kind in ("logits", "topk", "feat"):
                out[k] = v
        return out

    def render(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`x` of a batch that holds view records instead of pixels: its source images (decoded here for
        a streamed folder) replayed by the records; the records dropped."""
        if "x" in batch:
            return batch
        policy = ViewPolicy(**self.policy)
        split = resolve(self.train)
        images = split.images[np.searchsorted(split.ids, batch["sample_id"].numpy())]
        rec = {k: batch[C.record(k)].numpy() for k in policy.record}
        out = {k: v for k, v in batch.items() if not k.startswith("view_")}
        out["x"] = normalize(as_tensor(policy.render(images, rec)), self.mean, self.std).contiguous()
        return out


def resolve(ref):
    """The value of a Ray object ref (a value that is not one is returned as it is)."""
    if ref is None or not hasattr(ref, "hex"):  # already a value
        return ref
    import ray

    return ray.get(ref)


def render_view(split, share: np.ndarray, view: int, data_seed: int, policy: ViewPolicy, mean, std,
                defer: bool = False) -> dict:
    """View `view` of the rows `share` of a source split, rendered (the pure function of seed, sample id,
    view id the cache uses) and prepared: {sample_id, y, x}. `defer`: the view's records instead of `x`,
    for `RowFormat.render` to draw batch by batch (a streamed folder: its share is never decoded at once)."""
    ids = split.ids[share]
    out = {"sample_id": torch.from_numpy(ids.astype(np.int64)), "y": torch.from_numpy(split.labels[share].astype(np.int64))}
    if defer:
        rec = policy.params(data_seed, ids, view, split.images.shape[1:3])
        return {**out, **{C.record(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in rec.items()}}
    pixels, _ = make_views(split.images[share], ids, view, data_seed, policy)
    return {**out, "x": normalize(torch.from_numpy(pixels), mean, std).contiguous()}


def view_epochs(split, share: np.ndarray, data_seed: int, policy: ViewPolicy, mean, std, view_of, batch_size: int,
                shuffle: bool, seed: int, keep: bool = True, workers: int | None = None) -> "MemoryEpochs":
    """Epochs of views rendered from a source split: in memory as pixels, or — for a streamed image
    folder — as records rendered batch by batch ahead of the step (`MemoryEpochs.finish`, `workers`)."""
    from raykd.pipeline.data.datasets import FileImages

    streamed = isinstance(split.images, FileImages)
    finish = RowFormat(mean, std, policy.as_dict(), split).render if streamed else None
    return MemoryEpochs(lambda k: render_view(split, share, k, data_seed, policy, mean, std, defer=streamed),
                        view_of, batch_size, shuffle, seed, keep=keep, finish=finish, workers=workers)


class Refined:
    """The professor's column of each view, looked up by sample id (loaded once per view)."""

    def __init__(self, fs, files: dict[int, list[str]], checks=None):
        self.fs, self.files, self.checks, self.loaded = fs, files, checks, {}

    def lookup(self, view: int, ids: torch.Tensor) -> torch.Tensor:
        from raykd.pipeline.cache.reader import load_refined

        if view not in self.loaded:
            self.loaded[view] = load_refined(self.fs, self.files[view], checks=self.checks)
        keys, values = self.loaded[view]
        ids = ids.numpy()
        pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        if not np.array_equal(keys[pos], ids):
            raise RuntimeError("the cache's refined column lacks some of this view's sample ids: it does not match the cache")
        return torch.from_numpy(values[pos])


class MemoryEpochs:
    """Epochs from views held in memory: `load(view)` gives the worker's share of a view as prepared
    tensors, read once and kept for every later epoch of that view (`keep`); each epoch is a seeded
    permutation of it (or its order, without shuffling), batched by indexing.

    `finish`, per batch (views held as records: decode, crop, resize, flip, normalise), runs in a pool of
    `workers` threads (default: the torch threads the job holds, i.e. its share of the cores) ahead of
    the training step, at most 2 x workers batches ahead, and the batches come out in order: the same
    pixels whatever the pool size (PIL and torch release the GIL while they decode and resize)."""

    def __init__(self, load: Callable[[int], dict[str, torch.Tensor]], view_of: Callable[[int], int],
                 batch_size: int, shuffle: bool, seed: int, keep: bool = True,
                 finish: Callable[[dict], dict] | None = None, workers: int | None = None,
                 device=None, device_views: str | bool = "false", views_used: int = 1):
        self.load, self.view_of, self.batch_size, self.shuffle, self.seed, self.keep = \
            load, view_of, batch_size, shuffle, seed, keep
        self.finish = finish
        self.workers = max(1, workers or torch.get_num_threads())
        # on CUDA: the views on the device when they fit (`distill.device_views`), else batches pinned
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.device_views, self.views_used, self.on_device = device_views, views_used, None
        self.views: dict[int, dict[str, torch.Tensor]] = {}

    def prepare(self, epoch: int) -> None:
        k = self.view_of(epoch)
        if k not in self.views:
            if not self.keep:
                self.views.clear()
            rows = self.load(k)
            if self.on_device is None:  # decided on the first view: every view has its size
                nbytes = sum(v.numel() * v.element_size() for v in rows.values()) * (self.views_used if self.keep else 1)
                self.on_device = self.finish is None and device_views_choice(self.device_views, nbytes, self.device)
            if self.on_device:
                rows = {c: v.to(self.device) for c, v in rows.items()}
            self.views[k] = rows

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        self.prepare(epoch)
        rows = self.views[self.view_of(epoch)]
        n = len(rows["y"])
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            order = torch.randperm(n, generator=g).to(rows["y"].device)  # the same order wherever the view is
            batches = ({k: v[order[s:s + self.batch_size]] for k, v in rows.items()} for s in range(0, n, self.batch_size))
        else:
            batches = ({k: v[s:s + self.batch_size] for k, v in rows.items()} for s in range(0, n, self.batch_size))
        if self.device.type == "cuda" and not self.on_device:  # host batches pinned: asynchronous copies
            out = (lambda b: {k: v.pin_memory() for k, v in b.items()})  # noqa: E731
        else:
            out = (lambda b: b)  # noqa: E731
        if self.finish is None:
            yield from map(out, batches)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers, thread_name_prefix="raykd-render") as pool:  # decoding overlaps the step
            ahead = [pool.submit(self.finish, b) for b in itertools.islice(batches, 2 * self.workers)]
            for b in batches:
                ahead.append(pool.submit(self.finish, b))
                yield out(ahead.pop(0).result())
            for f in ahead:
                yield out(f.result())


class StreamEpochs:
    """Epochs streamed through Ray Data: `source(view)` is a Dataset or a Ray Train shard of the view;
    each batch is prepared by `prepare` (and the professor's column joined) as it arrives."""

    def __init__(self, source: Callable[[int], Any], view_of: Callable[[int], int], batch_size: int,
                 shuffle_buffer: int, seed: int, prepare: Callable[[dict], dict], refined: Refined | None = None,
                 check: Callable[[int], None] | None = None):
        self.source, self.view_of, self.batch_size, self.shuffle_buffer, self.seed = \
            source, view_of, batch_size, shuffle_buffer, seed
        self.prepare_rows, self.refined, self.check, self.checked = prepare, refined, check, set()

    def prepare(self, epoch: int) -> None:
        """Before a view's first epoch in this job: check its files (`check`), so a damaged one is named
        rather than failing deep inside Ray Data's read."""
        k = self.view_of(epoch)
        if self.check is not None and k not in self.checked:
            self.check(k)
            self.checked.add(k)

    def __call__(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        k = self.view_of(epoch)
        for raw in self.source(k).iter_torch_batches(
                batch_size=self.batch_size, device="cpu", local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=self.seed * 1000 + epoch):
            rows = self.prepare_rows(raw)
            if self.refined is not None:
                rows[C.REFINED] = self.refined.lookup(k, rows["sample_id"])
            yield rows


@dataclasses.dataclass(frozen=True)
class CacheViews:
    """The cache's views a training job reads, as one value that student and professor jobs share: the
    filesystem, each view's part files (`files[k]`: a `ViewFiles` on a cache being built waits for a view
    when it is first read), the columns read, their sha256 (`checks`, compared as each file is read), the
    professor's refined files when the job reads that column, and whether the job holds its views in
    memory or streams them through Ray Data. `epochs` builds the job's epochs, `datasets` Ray Train's."""

    fs: Any
    files: Any
    columns: tuple[str, ...]
    checks: Any = None
    refined: dict | None = None
    in_memory: bool = True

    @property
    def used(self) -> list[int]:
        return list(getattr(self.files, "used", None) or self.files)

    def _read(self, k: int):
        import ray

        return ray.data.read_parquet(self.files[k], filesystem=self.fs).select_columns(list(self.columns))

    def datasets(self) -> dict:
        """Ray Train's datasets of a streamed job (one per view, sharded between its workers); none in memory."""
        return {} if self.in_memory else {f"view{k}": self._read(k) for k in self.used}

    def epochs(self, ctx, view_of: Callable[[int], int], batch_size: int, shuffle: bool, seed: int,
               prepare: Callable[[dict], dict], memory_prepare: Callable[[dict], dict] | None = None,
               shuffle_buffer: int = 4096, **memory) -> MemoryEpochs | StreamEpochs:
        """In memory: each view read once (checked), this worker's share kept, prepared (`memory_prepare`,
        default `prepare`), then epochs by indexing (`memory`: MemoryEpochs' other options). Streamed: Ray
        Data batches (this worker's Ray Train shard when there are several), each prepared as it arrives."""
        refined = Refined(self.fs, self.refined, self.checks) if self.refined else None
        if self.in_memory:
            prep = memory_prepare or prepare

            def load(k: int) -> dict[str, torch.Tensor]:
                raw = read_view(self.fs, self.files[k], list(self.columns), self.checks)
                share = worker_share(len(raw["sample_id"]), ctx.rank, ctx.world, seed)
                rows = prep({c: v[share] for c, v in raw.items()})
                if refined is not None:
                    rows[C.REFINED] = refined.lookup(k, rows["sample_id"])
                return rows

            return MemoryEpochs(load, view_of, batch_size, shuffle, seed, **memory)
        source = (lambda k: ctx.shard(f"view{k}")) if ctx.world > 1 else self._read
        return StreamEpochs(source, view_of, batch_size, shuffle_buffer, seed, prepare, refined,
                            check_view(self.fs, self.files, self.checks))


def to_device(rows: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A batch on the training device, int8 feature maps dequantised with their per-row scale."""
    from raykd.pipeline.cache.codecs import dequantize_int8

    out = {}
    for k, v in rows.items():
        col = C.parse(k)
        if col.kind == "feat" and col.part == "scale":
            continue
        v = v.to(device, non_blocking=True)
        if k == "x" and v.is_cuda and v.dim() == 4:  # convolutions' fastest layout on CUDA
            v = v.contiguous(memory_format=torch.channels_last)
        if col.kind == "feat":
            scale = rows.get(C.scale(k))
            v = dequantize_int8(v, scale.to(device)) if scale is not None else v.float()
        out[k] = v
    return out


def device_views_choice(setting: str | bool, nbytes: int, device, free: int | None = None) -> bool:
    """`distill.device_views`: hold a job's in-memory views on its training device, indexed there with no
    copy per batch. true / false; auto: on CUDA when they take at most half the device's free memory
    (`free`: torch.cuda.mem_get_info's); on the CPU, where the views are already, auto is false."""
    device = torch.device(device)
    if setting in ("true", True):
        return True
    if setting in ("false", False) or device.type == "cpu":
        return False
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return nbytes <= free // 2


def in_memory_choice(setting: str, nbytes: int, budget: int | None = None) -> bool:
    """`distill.in_memory`: true, false, or auto (in memory when `nbytes` fit the budget)."""
    if setting in ("true", True):
        return True
    if setting in ("false", False):
        return False
    return nbytes <= (memory_budget() if budget is None else budget)



def check_view(fs, files: dict[int, list[str]], checks) -> Callable[[int], None]:
    """`check(view)` for StreamEpochs: read each of the view's files once and compare its sha256."""
    from raykd.pipeline.cache.storage import read_part

    def check(k: int) -> None:
        for path in files[k]:
            read_part(fs, path, checks.sha256.get(path), checks.uri, checks.root)

    return check
