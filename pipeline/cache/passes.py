"""The cache build's passes over the training views: `_local_pass` (one process: the teachers' forward at
large batches, the encoding and Parquet writing of one view overlapped with the next view's forward)
and `_ray_pass` (Ray Data: the views rendered by tasks, an actor pool per teacher), over the Ray Data
stages they share (`split_to_ray`, `decode_files`, `render_views`, `TeacherForward`, `encode_targets`).
"""

from __future__ import annotations

import posixpath
import sys
import time

import numpy as np
import torch

from raykd.pipeline.cache import columns as C
from raykd.pipeline.cache.codecs import mean_probs, quantize_int8, topk_encode
from raykd.pipeline.cache.storage import VIEWS, view_dir
from raykd.pipeline.core.log import log
from raykd.pipeline.core.progress import ProgressPrinter, emit
from raykd.pipeline.data.views import ViewPolicy, make_views
from raykd.pipeline.models.checkpoints import read_verified
from raykd.pipeline.models.plugins import job_imports

RENDER_ROWS = 4096  # rows of one render batch, at most: batch_size samples x the views of a pass


ROW_GROUP = 2048  # rows of a Parquet row group the local engine writes (a view of 8,000 rows: 4 groups, the first 3 while computing)


def split_to_ray(split, rows_per_block: int = 4096):
    """A split as a Ray Dataset of rows {sample_id, label, image (H, W, C) uint8 tensor}. A streamed
    folder's rows start as file paths and are decoded by Ray Data tasks (`decode_files`), not here."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    from raykd.pipeline.data.datasets import FileImages

    if isinstance(split.images, FileImages):
        tables = [pa.table({"sample_id": pa.array(split.ids[s:s + rows_per_block]),
                            "label": pa.array(split.labels[s:s + rows_per_block]),
                            "path": pa.array(list(split.images.paths[s:s + rows_per_block]), pa.string())})
                  for s in range(0, len(split), rows_per_block)]
        return ray.data.from_arrow(tables).map_batches(decode_files, batch_format="numpy", batch_size=256,
                                                       fn_kwargs={"size": split.images.size})
    tables = []
    for s in range(0, len(split), rows_per_block):
        e = s + rows_per_block
        tables.append(pa.table({
            "sample_id": pa.array(split.ids[s:e]),
            "label": pa.array(split.labels[s:e]),
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(split.images[s:e])),
        }))
    return ray.data.from_arrow(tables)


def decode_files(batch: dict, size: int) -> dict:
    """Paths -> images (a streamed folder's rows, decoded in a Ray Data task)."""
    from raykd.pipeline.data.datasets import FileImages

    return {"sample_id": batch["sample_id"], "label": batch["label"],
            "image": FileImages(batch["path"], size)[np.arange(len(batch["path"]))]}


def render_views(batch: dict, view_ids: list[int], data_seed: int, policy: dict) -> dict:
    """Stage 1: source rows -> one row per (sample, view): the view record and its pixels.
    A pure function of (seed, sample id, view id); `view` is the Hive partition key (= view_id)."""
    ids = np.tile(batch["sample_id"].astype(np.int64), len(view_ids))
    vids = np.repeat(np.asarray(view_ids, dtype=np.int32), len(batch["sample_id"]))
    images = np.concatenate([batch["image"]] * len(view_ids))
    policy = ViewPolicy(**policy)
    pixels, rec = make_views(images, ids, vids, data_seed, policy)
    return {
        "sample_id": ids,
        "view_id": vids,
        "view": vids.copy(),
        "label": np.tile(batch["label"].astype(np.int64), len(view_ids)),
        **{C.record(k): rec[k] for k in policy.record},
        C.PIXELS: pixels,
    }


def retain_freed_memory() -> bool:
    """Keep the memory a forward frees in this process's heap for the next batch (glibc's malloc only;
    returns whether it applied). PyTorch's CPU tensors come straight from malloc, and glibc by default
    hands a large freed block back to the kernel (an mmap'd chunk, or a trimmed heap top), so the next
    batch's activations are faulted in again page by page: `raykd cache` of 64,000 rows through resnet20
    at batch 512 took 6.2 M minor page faults (13 s of system time, about a fifth of its wall time) and
    0.25 M with these settings. Chunks up to 32 MiB come from the heap (M_MMAP_THRESHOLD, glibc's largest) and
    the heap top is kept up to 1 GiB (M_TRIM_THRESHOLD): the process keeps its peak heap until it exits,
    as a caching allocator would. Process-wide, so it is called where a process runs teachers' forwards
    for a whole build: the local engine's command, or a Ray Data actor."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc's own: musl has no such function
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


class TeacherForward:
    """Stage 2..N+1, one actor pool per teacher: loads the model once, adds its logits (fp16) and maps."""

    def __init__(self, name: str, arch: str, ckpt_path: str, weights: bytes, num_classes: int, in_chans: int,
                 mean, std, layers: list[str], feat_dtype: str, device: str, threads: int | None, progress=None,
                 imports=(), preprocess: dict | None = None):
        from raykd.pipeline.models import plugins
        from raykd.pipeline.models.checkpoints import load_into, state_from_bytes
        from raykd.pipeline.models.zoo import build_model, record_preprocess
    
        plugins.load(imports)
        retain_freed_memory()
        if threads:  # else Ray's default: as many as the actor's CPUs
            torch.set_num_threads(threads)
        self.name, self.layers, self.feat_dtype, self.progress = name, layers, feat_dtype, progress
        self.mean, self.std = mean, std
        self.device = torch.device(device)
        self.model = build_model(arch, num_classes, in_chans, record_preprocess({"preprocess": preprocess}))
        load_into(self.model, state_from_bytes(weights, ckpt_path), ckpt_path, arch)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        from raykd.pipeline.data.datasets import as_tensor, normalize

        x = normalize(as_tensor(batch[C.PIXELS]).to(self.device), self.mean, self.std)
        logits, stages = self.model.forward_stages(x)
        out = dict(batch)
        out[C.logits(self.name)] = logits.half().cpu().numpy()
        for layer in self.layers:
            fmap = stages[layer].float()
            col = C.feat(self.name, layer)
            if self.feat_dtype == "int8":
                q, scale = quantize_int8(fmap)
                out[col], out[C.scale(col)] = q.cpu().numpy(), scale.cpu().numpy()
            else:
                out[col] = fmap.half().cpu().numpy()
        ids, vids = batch["sample_id"], batch["view_id"]  # a batch's identity: retried batches count once
        emit(self.progress, (self.name, len(x), (int(ids[0]), int(vids[0]), int(ids[-1]), int(vids[-1]), len(x))))
        return out


def encode_targets(batch: dict, teachers: list[str], keep_logits: bool, k: int | None, of: str,
                   temperature: float) -> dict:
    """The last stage: top-k probabilities at tau of each teacher (or of their mean), full logits kept or not."""
    out = dict(batch)
    if k:
        zs = {t: torch.from_numpy(np.ascontiguousarray(batch[C.logits(t)])) for t in teachers}
        sources = {C.ENSEMBLE: mean_probs(list(zs.values()), temperature)} if of == "ensemble" else \
            {t: torch.softmax(z.float() / temperature, dim=1) for t, z in zs.items()}
        for src, p in sources.items():
            values, indices = topk_encode(p, k)
            probs_col, idx_col = C.topk(src)
            out[probs_col], out[idx_col] = values.numpy(), indices.numpy()
    if not keep_logits:
        for t in teachers:
            out.pop(C.logits(t))
    return out


def _forward_kwargs(cfg, splits, t: dict, device: str, threads: int | None, progress) -> dict:
    """TeacherForward's arguments for teacher entry `t` (its checkpoint read and verified here)."""
    c = cfg.cache
    return {"name": t["name"], "arch": t["arch"], "ckpt_path": t["checkpoint"],
            "weights": read_verified(t["checkpoint"], t["checkpoint_sha256"]), "num_classes": splits.num_classes,
            "in_chans": splits.in_chans, "mean": splits.mean, "std": splits.std, "layers": list(t["layers"]),
            "feat_dtype": c.feat_dtype, "device": device, "threads": threads, "progress": progress,
            "imports": job_imports(cfg), "preprocess": t.get("preprocess")}


def _targets_kwargs(targets: dict, teachers: list[dict]) -> dict | None:
    """encode_targets' arguments, or None when the rows keep every teacher's logits and nothing else."""
    if not (targets["topk"] or not targets["logits"]):
        return None
    tk = targets["topk"] or {}
    return {"teachers": [t["name"] for t in teachers], "keep_logits": targets["logits"], "k": tk.get("k"),
            "of": tk.get("of", "teachers"), "temperature": tk.get("temperature", 1.0)}


def _local_pass(cfg, splits, teachers, targets, device, fs, root):
    """A pass in this process, no Ray: every teacher loaded once for the whole build, then per batch of
    samples the views rendered, each teacher's forward (torch's threads: every core, or
    cache.threads_per_actor), the targets, and each view's rows appended to its Parquet file (about
    cache.rows_per_file rows) in row groups of ROW_GROUP rows, which a writer thread encodes and compresses
    while the next batches compute (pyarrow and zstd release the GIL). The files are what the Ray Data pass writes: same columns,
    same types, `views/view=k/` partitions without the `view` column."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    c = cfg.cache
    forwards = [TeacherForward(**_forward_kwargs(cfg, splits, t, device, c.threads_per_actor, None)) for t in teachers]
    encode = _targets_kwargs(targets, teachers)
    store = c.stores_views(splits.policy)
    n = len(splits.train)

    def to_table(batch: dict):
        cols = {k: (pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v)) if v.ndim > 1 else pa.array(v))
                for k, v in batch.items() if k != "view"}
        return pa.table(cols)

    class ViewFile:
        """View k's Parquet file being written: row groups of about ROW_GROUP rows appended by the writer
        thread while the next batches compute; a new file after about cache.rows_per_file rows."""

        def __init__(self, k: int):
            self.k, self.part, self.tables, self.queued, self.rows, self.out = k, 0, [], 0, 0, None

        def add(self, table) -> list:  # in the main thread: what to hand the writer, if anything
            self.tables.append(table)
            self.queued += table.num_rows
            return [self._group()] if self.queued >= min(ROW_GROUP, c.rows_per_file) else []

        def _group(self):
            tables, self.tables, self.queued = self.tables, [], 0
            self.rows += sum(t.num_rows for t in tables)
            last = self.rows >= c.rows_per_file
            if last:
                self.rows = 0
            return lambda: self._write(tables, last)

        def close(self) -> list:
            return [self._group()] if self.tables else []

        def _write(self, tables, last: bool) -> None:  # in the writer thread, in order
            table = pa.concat_tables(tables)
            if self.out is None:
                self.sink = pa.BufferOutputStream()
                self.out = pq.ParquetWriter(self.sink, table.schema, compression="zstd")
            self.out.write_table(table, row_group_size=table.num_rows)
            if last:
                self.finish()

        def finish(self) -> None:
            if self.out is None:
                return
            self.out.close()
            fs.makedirs(view_dir(root, self.k), exist_ok=True)
            fs.pipe_file(posixpath.join(view_dir(root, self.k), f"{uuid.uuid4().hex}_{self.part:06d}.parquet"),
                         self.sink.getvalue().to_pybytes())
            self.out, self.part = None, self.part + 1

    def run(group: list[int], progress: ProgressPrinter) -> None:
        for f in forwards:
            f.progress = progress.queue
        spent = dict.fromkeys(("render", "forward", "targets", "arrow", "writer"), 0.0)  # seconds, for `-v`
        pending, files = [], {k: ViewFile(k) for k in group}
        step = max(1, min(c.batch_size, RENDER_ROWS // len(group)))
        with progress, ThreadPoolExecutor(1, thread_name_prefix="raykd-cache-write") as writer:
            for s in range(0, n, step):
                e = min(n, s + step)
                t = time.perf_counter()
                batch = render_views({"sample_id": splits.train.ids[s:e], "label": splits.train.labels[s:e],
                                      "image": np.asarray(splits.train.images[s:e])}, group, cfg.data.seed,
                                     splits.policy.as_dict())
                spent["render"] += time.perf_counter() - t
                for j in range(0, len(batch["sample_id"]), c.batch_size):  # the teachers' batches
                    sub = {key: v[j:j + c.batch_size] for key, v in batch.items()}
                    t = time.perf_counter()
                    for f in forwards:
                        sub = f(sub)
                    t, spent["forward"] = time.perf_counter(), spent["forward"] + time.perf_counter() - t
                    if encode:
                        sub = encode_targets(sub, **encode)
                    if not store:
                        sub.pop(C.PIXELS)
                    t, spent["targets"] = time.perf_counter(), spent["targets"] + time.perf_counter() - t
                    for k in group:  # rows are view-major within a render batch
                        mask = sub["view_id"] == k
                        if mask.any():
                            pending += [writer.submit(w) for w in files[k].add(to_table({key: v[mask] for key, v in sub.items()}))]
                    t, spent["arrow"] = time.perf_counter(), spent["arrow"] + time.perf_counter() - t
                    while len(pending) > 2 * len(group):  # a bounded backlog; a failed write raises here
                        pending.pop(0).result()
                    spent["writer"] += time.perf_counter() - t
            t = time.perf_counter()
            for f in files.values():
                pending += [writer.submit(w) for w in f.close()]
                pending.append(writer.submit(f.finish))
            for p in pending:
                p.result()
            spent["writer"] += time.perf_counter() - t
        log.debug("[cache] views " + ranges(group) + ": " + ", ".join(f"{k} {v:.2f}s" for k, v in spent.items())
                  + f" (writer: waiting for the Parquet writer thread; torch threads {torch.get_num_threads()})")

    return run


def _ray_pass(cfg, splits, teachers, targets, device, fs, root):
    """A pass as one Ray Data pipeline: render, one actor pool per teacher, the targets, write_parquet."""
    from raykd.pipeline.harness.raysetup import check_fits, local_thread_share

    c = cfg.cache
    import ray  # started by _build_views
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat  # the enum's only home in 2.60

    ctx = ray.data.DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE  # pyarrow-native tensors
    ctx.enable_progress_bars = sys.stderr.isatty()  # Ray Data's bars in a terminal; our count lines anywhere
    # By default every actor may use all the node's cores, and the OS shares them: a stage waiting for
    # its input leaves its cores to the others. On 2 cores with 3 teachers this built views 14-19 % faster
    # than one thread per actor (cores split evenly), whose slowest teacher held everyone back.
    threads = c.threads_per_actor or local_thread_share(cfg.ray, 1)
    check_fits({"CPU": c.cpus_per_actor, "GPU": c.gpus_per_actor if device == "cuda" else 0},
               "cache.cpus_per_actor/gpus_per_actor")
    encode = _targets_kwargs(targets, teachers)

    def run(group: list[int], progress: ProgressPrinter) -> None:
        # a render batch of n samples becomes n x len(group) rows: at most RENDER_ROWS of them whatever K
        # is (else its memory grows with the views of a pass); a few views a pass render batch_size samples
        ds = split_to_ray(splits.train, rows_per_block=max(c.batch_size, 1024)).map_batches(
            render_views, batch_format="numpy", batch_size=max(1, min(c.batch_size, RENDER_ROWS // len(group))),
            fn_kwargs={"view_ids": group, "data_seed": cfg.data.seed, "policy": splits.policy.as_dict()})
        for t in teachers:
            res = {"num_gpus": c.gpus_per_actor} if device == "cuda" else {}
            ds = ds.map_batches(TeacherForward, batch_format="numpy", batch_size=c.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=c.actors(t["name"])), num_cpus=c.cpus_per_actor,
                                **res, fn_constructor_kwargs=_forward_kwargs(cfg, splits, t, device, threads, progress.queue))
        if encode:
            ds = ds.map_batches(encode_targets, batch_format="numpy", batch_size=c.batch_size, fn_kwargs=encode)
        if not c.stores_views(splits.policy):
            ds = ds.drop_columns([C.PIXELS])
        # Straight into the views/view=k partitions (file names are unique per write): no move, which on
        # S3 would be a copy of everything. A view counts only once its record under _views/ is written.
        # A write task gathers about rows_per_file rows of each view of the pass before writing, so files
        # are few and large while the compute stages stay fine-grained. (Ray marks min_rows_per_file with
        # partition_cols deprecated after Feb 2027; Ray is pinned to 2.60 here.)
        with progress:
            ds.write_parquet(posixpath.join(root, VIEWS), filesystem=fs, partition_cols=["view"],
                             min_rows_per_file=c.rows_per_file * len(group), compression="zstd")

    return run

def ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '[0-2, 5, 7-8]': a console line stays short whatever K is."""
    out, i = [], 0
    while i < len(ks):
        j = i
        while j + 1 < len(ks) and ks[j + 1] == ks[j] + 1:
            j += 1
        out.append(str(ks[i]) if i == j else f"{ks[i]}-{ks[j]}")
        i = j + 1
    return f"[{', '.join(out)}]"
