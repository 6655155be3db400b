"""Shard sources: image sets published as WebDataset-style tar shards, local or on any fsspec store (S3).

`data.name: webdataset`, `data.root: <folder or URL>` holding `train/*.tar` and `test/*.tar` (or `val/`).
A shard's samples are its members grouped by key (the name before the first dot, WebDataset's rule):
an image (`.jpg`, `.jpeg`, `.png`, `.webp`) and its class (`.cls`, an integer as text). Nothing is
materialised: indexing reads only the tar headers and the small `.cls` members, and each image is
read and decoded when a batch needs it, by its fsspec chained URL (`tar://<member>::<shard URL>`;
fsspec keeps one index of a shard per process). Sample ids are positions in the sorted shard list and,
within a shard, in key order: stable while the shards are. The images are `FileImages`, as an image
folder's, so views, caches and students treat both alike (resized on the short side and centre-cropped
to `data.image_size`).
"""

from __future__ import annotations

import posixpath

import numpy as np

from raykd.pipeline.data import DATASETS, FileImages, Raw, _policy
from raykd.pipeline.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _shards(fs, folder: str) -> list[str]:
    return sorted(p for p in fs.glob(posixpath.join(folder, "*.tar")))


def index_shards(fs, protocol: str, shards: list[str]) -> tuple[list[str], np.ndarray]:
    """(each sample's image URL, its class) over the shards, in order."""
    import fsspec

    urls, labels = [], []
    for shard in shards:
        url = shard if protocol in ("file", "local") else f"{protocol}://{shard}"
        tar = fsspec.filesystem("tar", fo=url)
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


@DATASETS.register("webdataset")
def _webdataset(root: str | None, image_size: int | None) -> Raw:
    from raykd.pipeline.cache.storage import open_fs, storage_errors, storage_message

    if not root:
        raise DataError("webdataset: set data.root to the folder or URL holding train/*.tar (and test/*.tar)")
    size = image_size or 32
    fs, base = open_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        train = _shards(fs, posixpath.join(base, "train"))
        if not train:
            raise DataError(f"webdataset: no train/*.tar under data.root={root}")
        test = next((s for d in ("test", "val") if (s := _shards(fs, posixpath.join(base, d)))), [])
        tr_urls, tr_y = index_shards(fs, protocol, train)
        te_urls, te_y = index_shards(fs, protocol, test) if test else ([], None)
    except storage_errors() as e:
        raise DataError(f"webdataset: {storage_message(root, e)}") from None
    num_classes = int(max(tr_y.max(), te_y.max() if te_y is not None and len(te_y) else 0)) + 1
    return Raw(FileImages(np.array(tr_urls, dtype=object), size), tr_y,
               FileImages(np.array(te_urls, dtype=object), size) if test else None, te_y, num_classes,
               _policy("imagefolder", size))
