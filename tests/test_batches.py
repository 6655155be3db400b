import types

"""Epoch data in memory or streamed: the same rows of the same views; each view read once; on-device sums."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import digits_cfg

from raykd.pipeline.cache.epochs import (
    CacheViews,
    MemoryEpochs,
    RowFormat,
    StreamEpochs,
    in_memory_choice,
    row_bytes,
    worker_share,
)
from raykd.pipeline.harness.job import EpochSums


def test_worker_shares_partition_the_rows():
    n = 1001
    shares = [worker_share(n, r, 3, seed=7) for r in range(3)]
    assert [len(s) for s in shares] == [333, 333, 333]  # equal: every worker takes the same number of steps
    assert all(np.all(np.diff(s) > 0) for s in shares)  # row order within a share
    assert len(set(np.concatenate(shares))) == 999  # disjoint
    assert np.array_equal(worker_share(n, 0, 1, seed=7), np.arange(n))
    assert np.array_equal(shares[1], worker_share(n, 1, 3, seed=7))  # the same on every worker (seeded)


def test_a_view_is_read_once_and_every_epoch_is_a_seeded_permutation():
    loads = []

    def load(k):
        loads.append(k)
        return {"y": torch.arange(10) + 100 * k, "x": torch.arange(10).float()}

    data = MemoryEpochs(load, lambda e: e % 2, batch_size=4, shuffle=True, seed=3)
    epochs = [torch.cat([b["y"] for b in data(e)]) for e in range(6)]
    assert loads == [0, 1]  # six epochs over K=2 views: each view read once
    assert [sorted(e.tolist()) for e in epochs[:2]] == [list(range(10)), list(range(100, 110))]
    assert not torch.equal(epochs[0], epochs[2])  # another permutation each epoch ...
    again = MemoryEpochs(load, lambda e: e % 2, batch_size=4, shuffle=True, seed=3)
    assert torch.equal(torch.cat([b["y"] for b in again(2)]), epochs[2])  # ... seeded by (seed, epoch): resumable
    still = MemoryEpochs(load, lambda e: e % 2, batch_size=4, shuffle=False, seed=3)
    assert torch.cat([b["y"] for b in still(0)]).tolist() == list(range(10))


def test_epoch_sums_name_the_first_nonfinite_step():
    s = EpochSums("cpu", every=4)
    for step in range(10):
        loss = torch.tensor(float("nan") if step == 5 else 1.0)
        s.add(step, {"loss": loss, "ce": torch.tensor(2.0)}, 8, torch.tensor(3))
        if s.bad is not None:
            break
    assert step == 7 and s.bad[0] == 5 and np.isnan(s.bad[1]["loss"]) and s.bad[1]["ce"] == 2.0
    ok = EpochSums("cpu", every=4)
    for step in range(6):
        ok.add(step, {"loss": torch.tensor(1.5), "ce": torch.tensor(0.5)}, 8, torch.tensor(3))
    assert ok.check() is None and ok.rows == 48 and float(ok.correct) == 18
    assert ok.sums.tolist() == [1.5 * 48, 0.5 * 48]


def test_the_memory_budget_decides_auto():
    cols = {"pixels": "tensor<uint8>[28, 28, 1]", "logits.a": "tensor<halffloat>[10]", "label": "int64"}
    assert row_bytes(cols, ["pixels", "logits.a", "label"]) == 784 * 4 + 10 * 2 + 8  # pixels ready to train, logits as stored
    assert in_memory_choice("auto", 10, budget=100) and not in_memory_choice("auto", 1000, budget=100)
    assert in_memory_choice(True, 1000, budget=1) and not in_memory_choice(False, 1, budget=100)


def _rows(batches):
    out = {}
    for b in batches:
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in out.items()}
    order = torch.argsort(out["sample_id"])
    return {k: v[order] for k, v in out.items()}


def test_memory_and_stream_give_the_same_rows_of_each_view(built, digits):
    import ray

    from raykd.pipeline.cache import Cache

    cfg, m = built
    cache = Cache(os.path.join(cfg.run.out_dir, "cache"))
    cols = ["sample_id", "label", "pixels", "logits.a", "logits.b", "feat.b.stage3"]
    files = {k: cache.view_files(k) for k in range(2)}
    fmt = RowFormat(digits.mean, digits.std, digits.policy.as_dict())
    ctx = types.SimpleNamespace(rank=0, world=1)
    memory = CacheViews(cache.fs, files, tuple(cols)).epochs(ctx, lambda e: e % 2, 100, True, 0, fmt.prepare,
                                                            memory_prepare=lambda raw: fmt.prepare(raw, defer=True))
    assert isinstance(memory, MemoryEpochs)
    stream = StreamEpochs(lambda k: ray.data.read_parquet(files[k], filesystem=cache.fs).select_columns(cols),
                          lambda e: e % 2, 100, 64, 0, fmt.prepare)
    for epoch in range(2):
        a, b = _rows(memory(epoch)), _rows(stream(epoch))
        assert sorted(a) == sorted(b) and len(a["y"]) == len(digits.train)
        assert a["sample_id"].tolist() == sorted(digits.train.ids.tolist())
        for k in a:
            assert torch.equal(a[k], b[k]), (epoch, k)
    # the view's pixels are the cache's: view 1 of sample s is its record replayed on the source image
    assert not torch.equal(_rows(memory(0))["x"], _rows(memory(1))["x"])


def test_in_memory_and_streamed_students_agree(built):
    """Same views, one full-split batch per step (order cannot matter): the same losses either way."""
    from raykd.pipeline.stages.distill import student_dir
    from raykd.pipeline.stages.students import run_distill

    cfg0, _ = built
    common = ["method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=2", "distill.optim.batch_size=2048",
              "distill.shuffle_buffer=0"]
    mem = digits_cfg(cfg0.run.out_dir, *common, "distill.name=agree-memory", "distill.in_memory=true")
    streamed = digits_cfg(cfg0.run.out_dir, *common, "distill.name=agree-stream", "distill.in_memory=false")
    run_distill(mem), run_distill(streamed)
    ma, mb = ([json.loads(x) for x in open(os.path.join(student_dir(c), "metrics.jsonl"))] for c in (mem, streamed))
    for a, b in zip(ma, mb):
        assert a["samples"] == b["samples"] and a["view"] == b["view"]
        for k in ("train_loss", "train_ce", "train_kd", "train_acc", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["epoch"], k)


@pytest.mark.parametrize("policy", [{"pad": 2, "flip": True}, {"kind": "random_resized_crop", "flip": True}])
def test_the_render_pool_gives_the_same_pixels_whatever_its_size(digit_folder, policy):
    """Views replayed from JPEGs (a streamed image folder) in a pool of 1 or 3 threads: every batch of
    every epoch identical, in the same order."""
    from raykd.pipeline.cache.epochs import view_epochs
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.datasets import FileImages
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.data.views import ViewPolicy

    splits = load_splits(DataSection(name="imagefolder", root=str(digit_folder), image_size=24))
    assert isinstance(splits.train.images, FileImages)
    share = np.arange(len(splits.train))

    def epochs(workers):
        data = view_epochs(splits.train, share, 0, ViewPolicy(**policy), splits.mean, splits.std, lambda e: e % 2, 8,
                           True, 5, workers=workers)
        return [[b["x"] for b in data(e)] for e in range(3)]

    one, three = epochs(1), epochs(3)
    assert [len(e) for e in one] == [len(e) for e in three] and len(one[0]) > 3
    assert all(torch.equal(a, b) for e1, e3 in zip(one, three) for a, b in zip(e1, e3))
    assert not torch.equal(one[0][0], one[1][0])  # another view, another order: the comparison can fail


def test_the_render_pool_has_as_many_threads_as_the_job_holds_cpus(digit_folder, monkeypatch):
    """The pool is sized by the job's torch threads (its share of the cores, set by the harness before the
    task is built) and every one of its threads renders batches."""
    import threading

    from raykd.pipeline.cache import epochs as E
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.data.views import ViewPolicy

    splits = load_splits(DataSection(name="imagefolder", root=str(digit_folder), image_size=24))
    render = E.RowFormat.render
    seen, gate = set(), threading.Barrier(3, timeout=10)

    def counted(self, batch):  # the first batches wait for each other: each on a thread of its own
        seen.add(threading.current_thread().name)
        if len(seen) <= 3:
            try:
                gate.wait()
            except threading.BrokenBarrierError:
                pass
        return render(self, batch)

    monkeypatch.setattr(E.RowFormat, "render", counted)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        data = E.view_epochs(splits.train, np.arange(len(splits.train)), 0, ViewPolicy(), splits.mean, splits.std,
                             lambda e: 0, 8, True, 5)
    finally:
        torch.set_num_threads(before)
    assert data.workers == 3
    assert len(list(data(0))) == -(-len(splits.train) // 8)
    assert len(seen) == 3 and all(n.startswith("raykd-render") for n in seen), seen


def test_device_views_decision_and_the_same_batches_either_way():
    from raykd.pipeline.cache.epochs import device_views_choice

    gib = 2**30
    assert device_views_choice("auto", 3 * gib, "cuda", free=8 * gib)  # fits half the free memory
    assert not device_views_choice("auto", 5 * gib, "cuda", free=8 * gib)
    assert device_views_choice(True, 50 * gib, "cuda", free=8 * gib) and not device_views_choice(False, 1, "cuda", free=8 * gib)
    assert not device_views_choice("auto", 1, "cpu")  # the views are there already
    view = {"x": torch.randn(100, 1, 4, 4), "y": torch.arange(100) % 10, "sample_id": torch.arange(100)}

    def epochs(setting):
        data = MemoryEpochs(lambda k: dict(view), lambda e: 0, 16, True, 3, device="cpu", device_views=setting)
        got = [[b for b in data(e)] for e in range(2)]
        return data.on_device, got

    (placed, a), (host, b) = epochs(True), epochs(False)
    assert placed and not host  # the two paths (indexing where the view lies, or on the host) both ran
    assert all(torch.equal(p[k], q[k]) for ea, eb in zip(a, b) for p, q in zip(ea, eb) for k in view)
    assert not torch.equal(a[0][0]["sample_id"], a[1][0]["sample_id"])  # a new permutation each epoch
