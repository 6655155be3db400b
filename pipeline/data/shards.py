"""Shard sources: image sets published as WebDataset-style tar shards or as Parquet files with an
image-bytes column (as Hugging Face datasets publish them), local or on any fsspec store (S3).

`data.name: webdataset`, `data.root: <folder or URL>` holding `train/*.tar` and `test/*.tar` (or `val/`).
A shard's samples are its members grouped by key (the name before the first dot, WebDataset's rule):
an image (`.jpg`, `.jpeg`, `.png`, `.webp`) and its class (`.cls`, an integer as text). Nothing is
materialised: indexing reads only the tar headers and the small `.cls` members, and each image is
read and decoded when a batch needs it, by its reference `tar://<member>::<shard URL>` through one
index of its shard per process (`tar_member`). Sample ids are positions in the sorted shard list and,
within a shard, in key order: stable while the shards are. The images are `FileImages`, as an image
folder's, so views, caches and students treat both alike (resized on the short side and centre-cropped
to `data.image_size`).

`data.name: parquet`, `data.root` holding `train/*.parquet` and `test/*.parquet` (or `val/`), or Hugging
Face's layout (`[data/]train-*.parquet`, `test-*` or `validation-*`). The image column is `image` (or
`img`, `jpg`, `jpeg`, `png`, `webp`): encoded bytes, or Hugging Face's `Image` struct {bytes, path}; the
class column `label` (or `labels`, `cls`, `target`), integers. Indexing reads each file's footer and
its class column only. An image is referred to as `pq:<row group>:<row>:<column>::<file URL>` and read
with its whole row group's image column (Parquet cannot read one row of a column chunk), kept per process
for the next images of that group (`_row_group`, 8 groups): reading in order — the cache build, the
evaluation — reads each group once; a shuffled epoch reads a group per image, so keep row groups small
for streamed students (Hugging Face writes 100 rows per group for image sets).
"""

from __future__ import annotations

import functools
import os
import posixpath

import numpy as np

from raykd.pipeline.core.errors import DataError
from raykd.pipeline.data.datasets import DATASETS, FileImages, Raw, _policy

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls", "target")


def _shards(fs, folder: str) -> list[str]:
    return sorted(p for p in fs.glob(posixpath.join(folder, "*.tar")))


def index_shards(fs, protocol: str, shards: list[str]) -> tuple[list[str], np.ndarray]:
    """(each sample's image URL, its class) over the shards, in order."""
    import fsspec

    urls, labels = [], []
    for shard in shards:
        url = shard if protocol in ("file", "local") else f"{protocol}://{shard}"
        tar = _tar(url, os.getpid())[0]
        members: dict[str, dict[str, str]] = {}
        for name in tar.find(""):
            base = posixpath.basename(name)
            key, dot, ext = base.partition(".")
            if dot:
                members.setdefault(posixpath.join(posixpath.dirname(name), key), {})["." + ext.lower()] = name
        for key in sorted(members):
            m = members[key]
            image = next((m[e] for e in IMAGE_EXTS if e in m), None)
            if image is None or ".cls" not in m:
                raise DataError(f"webdataset: {url}: sample {key!r} has no image ({'/'.join(IMAGE_EXTS)}) or no .cls")
            try:
                labels.append(int(tar.cat(m[".cls"]).decode().strip()))
            except ValueError:
                raise DataError(f"webdataset: {url}: {m['.cls']} is not an integer class") from None
            urls.append(f"tar://{image}::{url}")
    return urls, np.asarray(labels, dtype=np.int64)


@functools.lru_cache(maxsize=256)
def _tar(url: str, pid: int):
    """A shard's tar file system (its member index, read once) and the lock its reads take: one per shard
    and process (`pid`: a forked child opens its own). fsspec's chained `tar://<member>::<shard>` URL
    builds a new index, reading every member's header, on each open: 90 ms an image for a shard of
    1,000 samples, against 0.08 ms here. Up to 256 shards are kept open per process (a shuffled epoch
    over more of them indexes a shard again when it comes back)."""
    import threading

    import fsspec

    return fsspec.filesystem("tar", fo=url, skip_instance_cache=True), threading.Lock()


def tar_member(ref: str) -> bytes:
    """The bytes of a shard member, `tar://<member>::<shard URL>` (as index_shards names images). The
    shard's file object is shared, so reads of one shard take turns (the render pool's threads decode the
    bytes after, in parallel)."""
    member, _, url = ref[len("tar://"):].partition("::")
    tar, lock = _tar(url, os.getpid())
    with lock, tar.open(member, "rb") as f:
        return f.read()


def _tar_files(fs, base: str, names: tuple[str, ...]) -> list[str]:
    return next((s for d in names if (s := _shards(fs, posixpath.join(base, d)))), [])


def _shard_source(kind: str, root: str | None, image_size: int | None, train_files: str, find, index) -> Raw:
    """The splits of a shard source under `root`: `find(fs, base, names)` lists a split's files (those of
    the first of `names` that has any), `index(fs, protocol, files)` gives their (image refs, classes);
    `train_files` names what is looked for in messages. Streamed: the images stay in the shards."""
    from raykd.pipeline.cache.storage import open_fs, storage_errors, storage_message

    if not root:
        raise DataError(f"{kind}: set data.root to the folder or URL holding {train_files} (and the test split beside it)")
    size = image_size or 32
    fs, base = open_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        train = find(fs, base, ("train",))
        if not train:
            raise DataError(f"{kind}: no {train_files} under data.root={root}")
        test = find(fs, base, ("test", "val", "validation"))
        tr_refs, tr_y = index(fs, protocol, train)
        te_refs, te_y = index(fs, protocol, test) if test else ([], None)
    except storage_errors() as e:
        raise DataError(f"{kind}: {storage_message(root, e)}") from None
    if not len(tr_y):
        raise DataError(f"{kind}: the train files under data.root={root} hold no samples")
    num_classes = int(max(tr_y.max(), te_y.max() if te_y is not None and len(te_y) else 0)) + 1
    return Raw(FileImages(np.array(tr_refs, dtype=object), size), tr_y,
               FileImages(np.array(te_refs, dtype=object), size) if test else None, te_y, num_classes,
               _policy("imagefolder", size))


@DATASETS.register("webdataset")
def _webdataset(root: str | None, image_size: int | None) -> Raw:
    return _shard_source("webdataset", root, image_size, "train/*.tar", _tar_files, index_shards)


# --------------------------------------------------------------------------------------------------
# Parquet shards


def _parquet_files(fs, base: str, split_names: tuple[str, ...]) -> list[str]:
    for name in split_names:  # train/*.parquet, then Hugging Face's train-*.parquet (at the root or in data/)
        for pattern in (f"{name}/*.parquet", f"{name}-*.parquet", f"data/{name}-*.parquet"):
            if files := sorted(fs.glob(posixpath.join(base, pattern))):
                return files
    return []


def _columns(schema, url: str) -> tuple[str, str]:
    """(the image column as read: `image.bytes` for a struct, the class column) of one file's schema."""
    import pyarrow as pa

    names = schema.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    if image is None or label is None:
        raise DataError(f"parquet: {url}: no {'image' if image is None else 'class'} column (looked for "
                        f"{', '.join(IMAGE_COLUMNS if image is None else LABEL_COLUMNS)}; it has {', '.join(names)})")
    kind = schema.field(image).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        image = f"{image}.bytes"
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(f"parquet: {url}: column {image!r} is {kind}, not image bytes (binary or a struct with bytes)")
    if not pa.types.is_integer(schema.field(label).type):
        raise DataError(f"parquet: {url}: class column {label!r} is {schema.field(label).type}, not integers")
    return image, label


def index_parquet(fs, protocol: str, files: list[str]) -> tuple[list[str], np.ndarray]:
    """(each sample's image reference, its class) over the files, in order: footers and class columns only."""
    import pyarrow.parquet as pq

    refs, labels = [], []
    for path in files:
        url = path if protocol in ("file", "local") else f"{protocol}://{path}"
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
                raise DataError(f"parquet: {url} is not readable Parquet ({e})") from None
            image, label = _columns(pf.schema_arrow, url)
            ys = pf.read(columns=[label]).column(0)
            if ys.null_count:
                raise DataError(f"parquet: {url}: {ys.null_count} rows have no class in column {label!r}")
            labels.append(ys.to_numpy())
            for g in range(pf.metadata.num_row_groups):
                refs += [f"pq:{g}:{r}:{image}::{url}" for r in range(pf.metadata.row_group(g).num_rows)]
    return refs, np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)


def parquet_image(ref: str) -> bytes:
    """The encoded image a `pq:<row group>:<row>:<column>::<file URL>` reference names."""
    head, url = ref.split("::", 1)
    _, group, row, column = head.split(":", 3)
    image = _row_group(url, int(group), column)[int(row)]
    if image is None:
        raise DataError(f"parquet: {url}: row {row} of row group {group} has no image")
    return image


@functools.lru_cache(maxsize=8)
def _row_group(url: str, group: int, column: str) -> list:
    """One row group's encoded images (a list of bytes), read once per process while it is among the last 8."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        col = pq.ParquetFile(f).read_row_group(group, columns=[column]).column(0).combine_chunks()
    if "." in column:  # a struct {bytes, path}: its bytes
        col = col.field(column.split(".", 1)[1])
    return col.to_pylist()


@DATASETS.register("parquet")
def _parquet(root: str | None, image_size: int | None) -> Raw:
    return _shard_source("parquet", root, image_size, "train/*.parquet (or train-*.parquet)", _parquet_files,
                         index_parquet)


# ----------------------------------------------------------------------------------------------
# writing shards from an image folder (the tests and bench/stream.py make theirs so)


def _folder_samples(folder, split: str) -> list[tuple[str, int]]:
    """(path, class) of an image folder's split in `imagefolder`'s order: torchvision's sorted index, the
    classes named by train/."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    _, to_idx = find_classes(os.path.join(folder, "train"))
    return make_dataset(os.path.join(folder, split), to_idx, extensions=IMG_EXTENSIONS)


def write_tar_shards(folder, out, per_shard: int = 25) -> tuple[list[str], list[str]]:
    """An image folder's train/ and val/ (the imagefolder layout) as `webdataset` tar shards (<key>.jpg +
    <key>.cls) under out/train/ and out/test/, in the folder's own order (classes sorted, files sorted),
    `per_shard` samples each: (train shard paths, test shard paths)."""
    import io
    import tarfile

    made = {}
    for split, dest in (("train", "train"), ("val", "test")):
        samples = _folder_samples(folder, split)
        os.makedirs(os.path.join(out, dest), exist_ok=True)
        made[dest] = []
        for s in range(0, len(samples), per_shard):
            path = os.path.join(out, dest, f"{dest}-{s // per_shard:06d}.tar")
            with tarfile.open(path, "w") as tar:
                for i, (p, y) in enumerate(samples[s:s + per_shard]):
                    tar.add(p, arcname=f"{s + i:06d}.jpg")
                    info = tarfile.TarInfo(f"{s + i:06d}.cls")
                    data = str(y).encode()
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            made[dest].append(path)
    return made["train"], made["test"]


def write_parquet_shards(folder, out, per_file: int = 40, group: int = 16,
                         hf: bool = False) -> tuple[list[str], list[str]]:
    """An image folder's train/ and val/ as `parquet` shards: Parquet files with an image-bytes column
    (Hugging Face's `Image` struct {bytes, path}) and a `label` column, `per_file` rows each, row groups of
    `group`, in the folder's own order. `hf`: Hugging Face's layout (data/train-00000-of-0000N.parquet,
    validation-*)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    made = {}
    for split, dest in (("train", "train"), ("val", "validation" if hf else "test")):
        samples = _folder_samples(folder, split)
        n = -(-len(samples) // per_file)
        made[dest] = []
        for k, s in enumerate(range(0, len(samples), per_file)):
            rows = samples[s:s + per_file]
            images = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p, _ in rows]
            path = (os.path.join(out, "data", f"{dest}-{k:05d}-of-{n:05d}.parquet") if hf
                    else os.path.join(out, dest, f"{k:05d}.parquet"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(pa.table({"image": images, "label": pa.array([y for _, y in rows], pa.int64())}),
                           path, row_group_size=group)
            made[dest].append(path)
    return made["train"], made["validation" if hf else "test"]
