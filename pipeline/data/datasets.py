"""Dataset registry: every dataset becomes uint8 images (N, H, W, C); `data/splits.py` splits them train/val/test.

The bundled and torchvision sets (digits, Fashion-MNIST, CIFAR) are held in memory as arrays. An image
folder is streamed: its splits hold the sorted file list (`FileImages`), and indexing decodes just those
files, in whichever process (a Ray Data task, a worker) asks for them; `data.in_memory: true` decodes it
whole instead. Sample ids are indices into the source training set (for an image folder: its sorted file
index), stable across runs, so a cache row can always be traced back to its image. Nothing is ever
downloaded: data come from a local root or a package.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass

import numpy as np

from raykd.pipeline.core.errors import DataError
from raykd.pipeline.core.records import atomic_path
from raykd.pipeline.core.registry import Registry
from raykd.pipeline.data.views import ViewPolicy

DATASETS: Registry = Registry("dataset")


FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


@dataclass
class Raw:
    """What a loader returns: train (+ optional test) images as uint8 NHWC, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int
    policy: ViewPolicy  # the dataset's default view policy


class FileImages:
    """An image folder's images, decoded on demand: `images[idx]` (an index array or a slice) opens those
    files and returns uint8 (k, S, S, 3), each resized on its short side to S and centre-cropped, as the
    in-memory path does; `subset(idx)` is another FileImages (no decoding). Pickles as its paths."""

    def __init__(self, paths: np.ndarray, size: int):
        self.paths, self.size = np.asarray(paths, dtype=object), size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    ndim, dtype = 4, np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "FileImages":
        return FileImages(self.paths[idx], self.size)

    def __getitem__(self, idx) -> np.ndarray:
        paths = self.paths[idx]
        if isinstance(paths, str):
            return decode_image(paths, self.size)
        out = np.empty((len(paths), self.size, self.size, 3), np.uint8)
        for i, p in enumerate(paths):
            out[i] = decode_image(p, self.size)
        return out


def decode_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 (S, S, 3): RGB, short side resized to S (antialiased), centre crop."""
    from PIL import Image

    # a row of a Parquet shard's image column (pq:<group>:<row>:<column>::<URL>), a tar shard's member
    # (tar://<member>::<shard URL>): read through the shard's index, kept per process
    if path.startswith(("pq:", "tar://")):
        import io

        from raykd.pipeline.data.shards import parquet_image, tar_member

        img = Image.open(io.BytesIO((parquet_image if path.startswith("pq:") else tar_member)(path))).convert("RGB")
        return np.asarray(_fit(size)(img), dtype=np.uint8)
    if "::" in path or "://" in path:  # a URL, or another fsspec chained URL
        import fsspec

        opener = fsspec.open
    else:
        opener = open
    with opener(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    return np.asarray(_fit(size)(img), dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _fit(size: int):
    """Resize + centre crop to `size`, built once per size (decode_image runs per image on the hot path)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(size), v2.CenterCrop(size)])


def take(images, idx):
    """Rows `idx` of an image array, or of a FileImages without decoding them."""
    return images.subset(idx) if isinstance(images, FileImages) else images[idx]


def chunks(images, n: int = 1024):
    """(start, uint8 batch) over an array or a FileImages, `n` at a time: memory stays flat."""
    for s in range(0, len(images), n):
        yield s, np.asarray(images[s:s + n])


# each built-in data set's view policy (pad, flip), what `data.pad` / `data.flip: null` mean for it
DEFAULT_VIEWS = {"digits": (1, False), "fashion-mnist": (2, True), "fashion-mnist-pairs": (2, True),
                 "cifar10": (4, True), "cifar100": (4, True)}


def default_views(name: str, image_size: int | None) -> tuple[int, bool] | None:
    """(pad, flip) of a built-in data set (an image folder's pad: an eighth of its image size); None for a
    registered one, whose loader says."""
    if name in ("imagefolder", "webdataset", "parquet"):
        return max(1, (image_size or 32) // 8), True
    return DEFAULT_VIEWS.get(name)


def _policy(name: str, image_size: int | None = None) -> ViewPolicy:
    pad, flip = default_views(name, image_size)
    return ViewPolicy(pad=pad, flip=flip)


def cache_home() -> str:
    return os.environ.get("RAYKD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raykd")


@DATASETS.register("digits")
def _digits(root: str | None, image_size: int | None) -> Raw:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16): the embedded default. No test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return Raw(x, d.target.astype(np.int64), None, None, 10, _policy("digits"))


def _torchvision_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(ds.data)
    if x.ndim == 3:
        x = x[..., None]
    return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


@DATASETS.register("fashion-mnist")
def _fashion_mnist(root: str | None, image_size: int | None) -> Raw:
    """Fashion-MNIST from IDX files (the Debian package `dataset-fashion-mnist`), read by torchvision."""
    import torchvision

    root = root or FASHION_MNIST_DEBIAN
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    tv_root = _fashion_tv_root(root, names)
    try:
        tr = torchvision.datasets.FashionMNIST(tv_root, train=True, download=False)
        te = torchvision.datasets.FashionMNIST(tv_root, train=False, download=False)
    except RuntimeError as e:
        raise DataError(f"fashion-mnist: cannot read the IDX files under {root}: {e}") from None
    (trx, try_), (tex, tey) = _torchvision_arrays(tr), _torchvision_arrays(te)
    return Raw(trx, try_, tex, tey, 10, _policy("fashion-mnist"))


def make_pairs(images: np.ndarray, labels: np.ndarray, n: int, num_classes: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of two images drawn (seeded, with replacement) from `images` (N, H, W, 1), stacked as the two
    channels of one (H, W, 2) image, labelled num_classes * y_a + y_b: num_classes^2 classes, each sharing
    an item with 2 (num_classes - 1) others (the non-target classes a teacher confuses carry structure)."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(labels), size=(2, n))
    x = np.concatenate([images[a], images[b]], axis=3)
    return np.ascontiguousarray(x), (labels[a] * num_classes + labels[b]).astype(np.int64)


@DATASETS.register("fashion-mnist-pairs")
def _fashion_mnist_pairs(root: str | None, image_size: int | None) -> Raw:
    """100 classes from Fashion-MNIST: two items as the two channels of one 28x28 image, label 10 a + b;
    60,000 training pairs drawn from the training images, 10,000 test pairs from the test images (so a
    test pair never holds a training item). Two channels rather than side by side keep the image, and
    every model's cost after its first convolution, that of Fashion-MNIST."""
    raw = _fashion_mnist(root, image_size)
    trx, tr_y = make_pairs(raw.train_x, raw.train_y, len(raw.train_y), 10, seed=0)
    tex, te_y = make_pairs(raw.test_x, raw.test_y, len(raw.test_y), 10, seed=1)
    return Raw(trx, tr_y, tex, te_y, 100, _policy("fashion-mnist-pairs"))


def _fashion_tv_root(root: str, names: list[str]) -> str:
    """torchvision wants uncompressed files in <root>/FashionMNIST/raw; the Debian package ships .gz.

    Use <root> as is when it already has torchvision's layout, else decompress once into the raykd cache.
    """
    if all(os.path.exists(os.path.join(root, "FashionMNIST", "raw", n)) for n in names):
        return root
    found = {}
    for n in names:
        for cand in (os.path.join(root, n + ".gz"), os.path.join(root, n)):
            if os.path.exists(cand):
                found[n] = cand
                break
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(
            f"fashion-mnist: no IDX files under {root} (missing {', '.join(missing)}). Install them with "
            f"`make fashion-mnist` (Debian package dataset-fashion-mnist, files in {FASHION_MNIST_DEBIAN}) "
            "or set data.root to a folder holding them."
        )
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:12]
    tv_root = os.path.join(cache_home(), "fashion-mnist", key)
    raw = os.path.join(tv_root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for n, src in found.items():
        dst = os.path.join(raw, n)
        if os.path.exists(dst):
            continue
        opener = gzip.open if src.endswith(".gz") else open
        with atomic_path(dst) as tmp, opener(src, "rb") as fi, open(tmp, "wb") as fo:  # a reader never sees half
            shutil.copyfileobj(fi, fo)
    return tv_root


def _cifar(cls_name: str, num_classes: int):
    def load(root: str | None, image_size: int | None) -> Raw:
        import torchvision

        if not root:
            raise DataError(f"{cls_name.lower()}: set data.root to the folder holding the extracted python archive")
        cls = getattr(torchvision.datasets, cls_name)
        try:
            tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
        except RuntimeError as e:
            raise DataError(f"{cls_name.lower()}: not found or corrupt under data.root={root} ({e})") from None
        (trx, try_), (tex, tey) = _torchvision_arrays(tr), _torchvision_arrays(te)
        return Raw(trx, try_, tex, tey, num_classes, _policy(cls_name.lower()))

    return load


DATASETS.register("cifar10")(_cifar("CIFAR10", 10))


DATASETS.register("cifar100")(_cifar("CIFAR100", 100))


@DATASETS.register("imagefolder")
def _imagefolder(root: str | None, image_size: int | None, in_memory: bool = False) -> Raw:
    """<root>/train/<class>/* and <root>/test/<class>/* (or val/): torchvision's sorted ImageFolder index
    (classes sorted, files sorted within each), each image resized on its short side and centre-cropped
    to `image_size`; streamed (FileImages) unless `in_memory`."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root or not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"imagefolder: data.root={root} must hold a train/ folder of class folders")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    size = image_size or 32
    classes, class_to_idx = find_classes(os.path.join(root, "train"))

    def index(path: str):
        found, _ = find_classes(path)
        if found != classes:
            raise DataError(f"imagefolder: {path} has classes {found}, train/ has {classes}")
        samples = make_dataset(path, class_to_idx, extensions=IMG_EXTENSIONS)
        images = FileImages(np.array([p for p, _ in samples], dtype=object), size)
        labels = np.array([y for _, y in samples], dtype=np.int64)
        if in_memory:
            images = np.concatenate([b for _, b in chunks(images)]) if len(images) else images[[]]
        return images, labels

    trx, try_ = index(os.path.join(root, "train"))
    tex, tey = index(test_dir) if test_dir else (None, None)
    return Raw(trx, try_, tex, tey, len(classes), _policy("imagefolder", size))


def as_tensor(a):
    """A numpy array as a torch tensor, without a copy unless it is read-only (then copied: torch would
    warn, and writing to it would be undefined)."""
    import torch

    if isinstance(a, torch.Tensor):
        return a
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def normalize(images_u8, mean, std):
    """uint8 (B, H, W, C) torch tensor -> float32 (B, C, H, W), standardised; works on any device."""
    import torch

    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


from raykd.pipeline.data import shards  # noqa: E402,F401 - registers the shard sources (webdataset, parquet)
