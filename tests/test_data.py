import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from raykd.pipeline.core.errors import DataError
from raykd.pipeline.core.sections import DataSection
from raykd.pipeline.data.shards import write_parquet_shards, write_tar_shards
from raykd.pipeline.data.splits import load_splits


def test_digits_splits_are_seeded_and_disjoint(digits):
    s = digits
    assert s.num_classes == 10
    assert s.train.images.shape[1:] == (8, 8, 1) and s.train.images.dtype == np.uint8
    ids = [set(s.train.ids), set(s.val.ids), set(s.test.ids)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == 1797
    assert len(s.test) == round(1797 * 0.2)
    again = load_splits(DataSection())
    np.testing.assert_array_equal(again.val.ids, s.val.ids)
    assert again.fingerprint == s.fingerprint
    other = load_splits(DataSection(seed=1))
    assert set(other.val.ids) != set(s.val.ids) and other.fingerprint != s.fingerprint
    assert s.policy.pad == 1 and s.policy.flip is False


def test_train_subset_and_policy_override():
    s = load_splits(DataSection(train_subset=100, pad=0, flip=True))
    assert len(s.train) == 100 and s.policy.pad == 0 and s.policy.flip


def _idx(path, arr, labels=False):
    with gzip.open(path, "wb") as f:
        if labels:
            f.write(struct.pack(">II", 2049, len(arr)) + arr.astype(np.uint8).tobytes())
        else:
            f.write(struct.pack(">IIII", 2051, *arr.shape) + arr.astype(np.uint8).tobytes())


def test_test_subset_is_a_seeded_subset_of_the_test_split(digits):
    s = load_splits(DataSection(test_subset=50))
    assert len(s.test) == 50 and set(s.test.ids) <= set(digits.test.ids)
    label_of = dict(zip(digits.test.ids.tolist(), digits.test.labels.tolist()))
    assert s.test.labels.tolist() == [label_of[i] for i in s.test.ids.tolist()]
    np.testing.assert_array_equal(s.test.ids, load_splits(DataSection(test_subset=50)).test.ids)
    assert s.fingerprint != digits.fingerprint
    np.testing.assert_array_equal(s.train.ids, digits.train.ids)  # train and val untouched


def test_fashion_mnist_reads_debian_layout(tmp_path, monkeypatch):
    # the Debian package's layout: four gzipped IDX files in one folder; read with torchvision's loader
    monkeypatch.setenv("RAYKD_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    trx, tex = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 256, (20, 28, 28))
    try_, tey = rng.integers(0, 10, 50), rng.integers(0, 10, 20)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", trx)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", try_, labels=True)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", tex)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", tey, labels=True)
    s = load_splits(DataSection(name="fashion-mnist", root=str(tmp_path), val_fraction=0.2))
    assert len(s.train) == 40 and len(s.val) == 10 and len(s.test) == 20
    np.testing.assert_array_equal(s.test.images[..., 0], tex)
    np.testing.assert_array_equal(s.train.images[..., 0], trx[s.train.ids])
    np.testing.assert_array_equal(s.train.labels, try_[s.train.ids])
    assert s.policy.pad == 2 and s.policy.flip


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="make fashion-mnist"):
        load_splits(DataSection(name="fashion-mnist", root=str(tmp_path)))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_never_downloads(tmp_path, name):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_splits(DataSection(name=name, root=str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    s = load_splits(DataSection(name="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25))
    assert s.num_classes == 2 and s.train.images.shape[1:] == (16, 16, 3)
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 4
    with pytest.raises(DataError, match="train/"):
        load_splits(DataSection(name="imagefolder", root=str(tmp_path / "test")))


def test_streamed_imagefolder_equals_in_memory(digit_folder):
    """A streamed folder holds file paths (pickled as such), decodes only what is indexed, and gives the
    same ids, labels, pixels, statistics and fingerprint's split as the folder decoded into memory."""
    import pickle

    from raykd.pipeline.data.datasets import FileImages

    cfg = DataSection(name="imagefolder", root=str(digit_folder), image_size=16, val_fraction=0.2)
    lazy, eager = load_splits(cfg), load_splits(cfg.model_copy(update={"in_memory": True}))
    assert isinstance(lazy.train.images, FileImages) and isinstance(eager.train.images, np.ndarray)
    assert len(pickle.dumps(lazy.train)) < 20_000 < eager.train.images.nbytes  # paths, not pixels
    for a, b in ((lazy.train, eager.train), (lazy.val, eager.val), (lazy.test, eager.test)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images[np.arange(len(a))], b.images)
        np.testing.assert_array_equal(a.images[3:7], b.images[3:7])
    assert lazy.mean == pytest.approx(eager.mean, abs=1e-12) and lazy.std == pytest.approx(eager.std, abs=1e-12)
    assert lazy.image_size == 16 and lazy.in_chans == 3 and lazy.num_classes == 10
    # given statistics skip the pass and enter the fingerprint
    given = load_splits(cfg.model_copy(update={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    assert given.mean == (0.5, 0.5, 0.5) and given.fingerprint != lazy.fingerprint
    # the data fingerprint follows the files: another file's bytes, another fingerprint
    victim = lazy.train.images.paths[0]
    Image.open(victim).rotate(90).save(victim)
    assert load_splits(cfg).fingerprint != lazy.fingerprint


def test_a_teacher_trains_on_a_streamed_folder_batch_by_batch(digit_folder, tmp_path):
    """A teacher trained on a streamed folder holds its epoch as view records and decodes each batch
    (one ahead, in a thread): it trains exactly as on the folder decoded into memory."""
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.teachers import run_teachers

    base = ["run.device=cpu", "data.name=imagefolder", f"data.root={digit_folder}", "data.image_size=16",
            "data.val_fraction=0.2", "teachers.optim.epochs=2", "teachers.optim.batch_size=16",
            "teachers.models=[{name: t, arch: cnn4, seed: 1}]", "cache.layers={}"]
    (lazy,) = run_teachers(load_config(None, [f"run.out_dir={tmp_path / 'lazy'}", *base]))
    (eager,) = run_teachers(load_config(None, [f"run.out_dir={tmp_path / 'eager'}", "data.in_memory=true", *base]))
    assert lazy["val_acc"] == eager["val_acc"] and lazy["test_acc"] == eager["test_acc"]
    assert lazy["best"]["sha256"] == eager["best"]["sha256"]  # the same weights, bit for bit


def test_streamed_epochs_hold_records_not_pixels(digit_folder):
    from raykd.pipeline.cache.epochs import view_epochs

    s = load_splits(DataSection(name="imagefolder", root=str(digit_folder), image_size=16, val_fraction=0.2))
    epochs = view_epochs(s.train, np.arange(len(s.train)), 0, s.policy, s.mean, s.std, lambda e: e, 8, True, 0)
    epochs.prepare(0)
    assert "x" not in epochs.views[0] and "view_ox" in epochs.views[0]
    batches = list(epochs(0))
    assert sum(len(b["y"]) for b in batches) == len(s.train) and all(b["x"].shape[1:] == (3, 16, 16) for b in batches)


def test_pairs_stack_two_real_items_and_label_them_10a_plus_b():
    """The 100-class construction on real images (digits): each pair's channels are two source images and
    its label names both; every class shares an item with 18 others."""
    from sklearn.datasets import load_digits

    from raykd.pipeline.data.datasets import make_pairs

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    px, py = make_pairs(x, d.target, 5000, 10, seed=0)
    assert px.shape == (5000, 8, 8, 2) and px.dtype == np.uint8 and py.min() >= 0 and py.max() <= 99
    assert len(np.unique(py)) == 100
    flat = {img.tobytes(): int(y) for img, y in zip(x[..., 0], d.target)}
    for img, y in zip(px[:50], py[:50]):
        a, b = flat[img[..., 0].tobytes()], flat[img[..., 1].tobytes()]
        assert y == 10 * a + b
    again, _ = make_pairs(x, d.target, 5000, 10, seed=0)
    assert np.array_equal(px, again)  # seeded


# --------------------------------------------------------------------------------------------------
# shard sources: WebDataset-style tar shards made here from the digit folder's real JPEGs


def test_webdataset_shards_are_the_image_folder_streamed(digit_folder, tmp_path):
    from raykd.pipeline.data.datasets import FileImages

    write_tar_shards(digit_folder, tmp_path / "wds")
    folder = load_splits(DataSection(name="imagefolder", root=str(digit_folder), image_size=24))
    shards = load_splits(DataSection(name="webdataset", root=str(tmp_path / "wds"), image_size=24))
    assert isinstance(shards.train.images, FileImages)  # streamed: decoded when read
    assert shards.train.images.paths[0].startswith("tar://000")  # a member of its shard, by fsspec's chained URL
    for a, b in ((folder.train, shards.train), (folder.val, shards.val), (folder.test, shards.test)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images[np.arange(len(a))], b.images[np.arange(len(b))])
    assert (shards.num_classes, shards.policy) == (folder.num_classes, folder.policy)
    assert shards.fingerprint != folder.fingerprint  # other files: another source


def test_a_tar_shard_is_indexed_once_and_read_from_threads_alike(digit_folder, tmp_path):
    """Each member is read through one index of its shard per process (fsspec's chained URL would read
    every header again for each image: 90 ms an image in a shard of 1,000), and the pool's threads, which
    share the shard's file, read the same bytes as one thread does."""
    import tarfile
    from concurrent.futures import ThreadPoolExecutor

    from raykd.pipeline.data.shards import _tar, tar_member

    (shard,), _ = write_tar_shards(digit_folder, tmp_path / "wds", per_shard=10_000)
    with tarfile.open(shard) as t:
        refs = [f"tar://{m.name}::{shard}" for m in t.getmembers()]
    _tar.cache_clear()
    alone = [tar_member(r) for r in refs]
    assert (_tar.cache_info().misses, _tar.cache_info().hits) == (1, len(refs) - 1)
    with tarfile.open(shard) as t:  # what the members hold
        assert alone == [t.extractfile(m).read() for m in t.getmembers()]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(tar_member, refs)) == alone


@pytest.mark.parametrize("hf", [False, True], ids=["folders", "hugging-face-layout"])
def test_parquet_shards_are_the_image_folder_streamed(digit_folder, tmp_path, hf):
    from raykd.pipeline.data.datasets import FileImages
    from raykd.pipeline.data.shards import _row_group

    write_parquet_shards(digit_folder, tmp_path / "pq", hf=hf)
    folder = load_splits(DataSection(name="imagefolder", root=str(digit_folder), image_size=24))
    shards = load_splits(DataSection(name="parquet", root=str(tmp_path / "pq"), image_size=24))
    assert isinstance(shards.train.images, FileImages)  # streamed: decoded when read
    assert shards.train.images.paths[0].startswith("pq:0:0:image.bytes::")
    _row_group.cache_clear()
    shards.train.images[np.arange(len(shards.train))]  # in order: each row group read once
    groups = {(p.split("::")[1], p.split(":")[1]) for p in shards.train.images.paths}
    assert _row_group.cache_info().misses == len(groups) > 1
    for a, b in ((folder.train, shards.train), (folder.val, shards.val), (folder.test, shards.test)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images[np.arange(len(a))], b.images[np.arange(len(b))])
    assert (shards.num_classes, shards.policy) == (folder.num_classes, folder.policy)
    assert shards.fingerprint != folder.fingerprint


@pytest.mark.parametrize("source,make,first,missing", [
    ("webdataset", lambda f, out: write_tar_shards(f, out, per_shard=40), "train/train-000000.tar", r"train/\*.tar"),
    ("parquet", write_parquet_shards, "train/00000.parquet", r"train/\*.parquet \(or train-\*.parquet\)"),
])
def test_shards_on_s3(digit_folder, tmp_path, s3_endpoint, source, make, first, missing):
    """Shards uploaded to an S3 endpoint are read by their URLs: the same rows and pixels as on local disk."""
    import boto3

    train, test = make(digit_folder, tmp_path / "shards")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=source)
    for p in train + test:
        s3.upload_file(p, source, f"shards/{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}")
    local = load_splits(DataSection(name=source, root=str(tmp_path / "shards"), image_size=24))
    remote = load_splits(DataSection(name=source, root=f"s3://{source}/shards", image_size=24))
    assert remote.train.images.paths[0].endswith(f"::s3://{source}/shards/{first}")
    np.testing.assert_array_equal(local.train.labels, remote.train.labels)
    np.testing.assert_array_equal(local.test.labels, remote.test.labels)
    np.testing.assert_array_equal(local.train.images[np.arange(len(local.train))],
                                  remote.train.images[np.arange(len(remote.train))])
    with pytest.raises(DataError, match=f"{source}: no {missing} under data.root=s3://{source}/nothing"):
        load_splits(DataSection(name=source, root=f"s3://{source}/nothing", image_size=24))


def test_a_parquet_file_without_images_or_classes_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "bad" / "train")
    bad = tmp_path / "bad" / "train" / "a.parquet"
    pq.write_table(pa.table({"pixels": [b"abc"], "label": [1]}), bad)
    with pytest.raises(DataError, match=r"a.parquet: no image column \(looked for image, .*; it has pixels, label\)"):
        load_splits(DataSection(name="parquet", root=str(tmp_path / "bad")))
    pq.write_table(pa.table({"image": ["not bytes"], "label": [1]}), bad)
    with pytest.raises(DataError, match=r"a.parquet: column 'image' is string, not image bytes"):
        load_splits(DataSection(name="parquet", root=str(tmp_path / "bad")))
    pq.write_table(pa.table({"image": [b"abc"], "label": ["cat"]}), bad)
    with pytest.raises(DataError, match=r"a.parquet: class column 'label' is string, not integers"):
        load_splits(DataSection(name="parquet", root=str(tmp_path / "bad")))
    bad.write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match=r"parquet: .*a.parquet is not readable Parquet"):
        load_splits(DataSection(name="parquet", root=str(tmp_path / "bad")))


def test_a_shard_sample_without_its_class_is_named(tmp_path):
    import io
    import tarfile

    os.makedirs(tmp_path / "bad" / "train")
    with tarfile.open(tmp_path / "bad" / "train" / "a.tar", "w") as tar:
        info = tarfile.TarInfo("000001.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match=r"a.tar: sample '000001' has no image .* or no .cls"):
        load_splits(DataSection(name="webdataset", root=str(tmp_path / "bad")))
