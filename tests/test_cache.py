"""The teacher cache: exact contents, reuse, refusal, corruption, a killed build, and S3."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TEACHERS, build_until_view_0, digits_cfg

from raykd.pipeline.cache import (
    Cache,
    CacheError,
    build_cache,
    column_array,
    dequantize_int8,
    inspect_cache,
    quantize_int8,
)
from raykd.pipeline.core.errors import RaykdError
from raykd.pipeline.data.datasets import normalize
from raykd.pipeline.data.views import apply_views
from raykd.pipeline.stages.teachers import load_teacher

pytestmark = pytest.mark.timeout(400)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listing(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


def test_rows_and_columns(built, digits):
    cfg, m = built
    assert m["rows"] == 2 * len(digits.train) and m["views"] == 2
    cache = Cache(os.path.join(cfg.run.out_dir, "cache"))
    t = cache.read_table(["sample_id", "view_id"])
    pairs = set(zip(column_array(t, "sample_id").tolist(), column_array(t, "view_id").tolist()))
    assert len(pairs) == t.num_rows == 2 * len(digits.train)
    assert m["columns"]["logits.a"] == "tensor<halffloat>[10]"
    assert m["columns"]["feat.b.stage3"] == "tensor<halffloat>[64, 2, 2]"
    assert m["columns"]["pixels"] == "tensor<uint8>[8, 8, 1]"
    # layout 2: the rows under their own root, metadata beside it
    assert sorted(os.listdir(os.path.join(cfg.run.out_dir, "cache"))) == [
        "_views", "config.resolved.yaml", "manifest.json", "views"]
    assert sorted(os.listdir(os.path.join(cfg.run.out_dir, "cache", "views"))) == ["view=0", "view=1"]
    assert m["schema_version"] == 2 and m["shapes"]["pixels"] == [8, 8, 1] and m["shapes"]["logits.a"] == [10]
    assert m["targets"] == {"logits": True, "topk": None}
    assert "views: 2" in open(os.path.join(cfg.run.out_dir, "cache", "config.resolved.yaml")).read()


def test_cached_outputs_equal_direct_forward_on_replayed_views(built, digits):
    cfg, m = built
    cache = Cache(os.path.join(cfg.run.out_dir, "cache"))
    t = cache.read_table()
    rows = np.random.default_rng(0).choice(t.num_rows, 40, replace=False)
    ids = column_array(t, "sample_id")[rows]
    pos = np.searchsorted(digits.train.ids, ids)
    assert (digits.train.ids[pos] == ids).all()
    replay = apply_views(digits.train.images[pos], column_array(t, "view_ox")[rows], column_array(t, "view_oy")[rows],
                         column_array(t, "view_flip")[rows], digits.policy.pad)
    np.testing.assert_array_equal(column_array(t, "pixels")[rows], replay)
    np.testing.assert_array_equal(column_array(t, "label")[rows], digits.train.labels[pos])
    x = normalize(torch.from_numpy(replay), digits.mean, digits.std)
    for name in ("a", "b"):
        model, _ = load_teacher(cfg.run.out_dir, name)
        with torch.no_grad():
            logits, stages = model.forward_stages(x)
        cached = torch.from_numpy(column_array(t, f"logits.{name}")[rows].astype(np.float32))
        torch.testing.assert_close(cached, logits, rtol=2e-3, atol=2e-3)  # fp16 storage
        if name == "b":
            for layer in ("stage2", "stage3"):
                feat = torch.from_numpy(column_array(t, f"feat.b.{layer}")[rows].astype(np.float32))
                torch.testing.assert_close(feat, stages[layer], rtol=2e-3, atol=2e-3)


def _by_key(table) -> dict:
    """Every column of a cache table as numpy, rows ordered by (view_id, sample_id)."""
    order = np.lexsort((column_array(table, "sample_id"), column_array(table, "view_id")))
    return {n: column_array(table, n)[order] for n in table.column_names}


def test_local_and_ray_data_builds_write_the_same_cache(built, ray_session, tmp_path):
    """The shared cache was built in the test's process (cache.engine auto = local on one machine); the same
    config through the Ray Data pipeline (actor pools) writes the same manifest columns, the same Arrow schema
    and the same values, bit for bit, top-k targets included."""
    cfg, m = built
    topk = ["cache.topk=3", "cache.batch_size=128"]
    local = build_cache(digits_cfg(cfg.run.out_dir, f"cache.uri={tmp_path / 'local'}", *topk))
    ray_built = build_cache(digits_cfg(cfg.run.out_dir, f"cache.uri={tmp_path / 'ray'}", "cache.engine=ray", *topk))
    assert local["fingerprint"] == ray_built["fingerprint"]  # the engine is not an input of the cache
    assert local["columns"] == ray_built["columns"] and "topk.b.probs" in local["columns"]
    a, b = Cache(str(tmp_path / "local")).read_table(), Cache(str(tmp_path / "ray")).read_table()
    assert a.schema.equals(b.schema)
    a, b = _by_key(a), _by_key(b)
    assert set(a) == set(b) and len(a["sample_id"]) == 2 * len(np.unique(a["sample_id"]))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_finished_cache_is_reused(built, capsys):
    cfg, m = built
    root = os.path.join(cfg.run.out_dir, "cache")
    before = _listing(root)
    assert build_cache(cfg) == m
    assert "up to date" in capsys.readouterr().out
    assert _listing(root) == before


def test_cache_of_other_inputs_is_refused(built):
    cfg, _ = built
    root = os.path.join(cfg.run.out_dir, "cache")
    before = _listing(root)
    with pytest.raises(CacheError, match="other inputs.*--overwrite"):
        build_cache(digits_cfg(cfg.run.out_dir, "cache.views=3"))
    assert _listing(root) == before


def test_cli_refuses_a_cache_of_other_teachers(built, cli):
    cfg, _ = built
    root = os.path.join(cfg.run.out_dir, "cache")
    before = _listing(root)
    code, _, err = cli("cache", f"run.out_dir={cfg.run.out_dir}", "run.device=cpu", TEACHERS, "teachers.optim.epochs=2",
                       "cache.views=2", "cache.teachers=[a]")
    assert code == 2 and "holds a finished cache of other inputs" in err and "--overwrite" in err
    assert "Traceback" not in err and _listing(root) == before


def test_reader_refuses_what_the_caller_does_not_expect(built):
    cfg, _ = built
    cache = Cache(os.path.join(cfg.run.out_dir, "cache"))
    with pytest.raises(CacheError, match=r"no teacher 'c' in the cache \(cached teachers: \['a', 'b'\]\)"):
        cache.expect(teachers=["a", "c"])
    with pytest.raises(CacheError, match="K=2"):
        cache.expect(views=4)
    with pytest.raises(CacheError, match="feat.a.stage3"):
        cache.expect(columns=["feat.a.stage3"])
    cache.expect(teachers=["b", "a"], views=2, columns=["logits.a", "feat.b.stage3"])
    ds = cache.view_dataset(1, columns=["sample_id", "view_id", "logits.b"])
    assert ds.count() == cache.manifest["rows"] // 2
    assert set(ds.unique("view_id")) == {1}


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "has .* bytes"),
    ("delete", "is missing"),
    ("stray", "not listed"),
    ("manifest_json", "not valid JSON"),
    ("manifest_schema", "schema_version"),
    ("manifest_v1", r"first layout \(schema_version 1.*rebuild it with `raykd cache --overwrite`"),
    ("manifest_edit", "has .* bytes, manifest.json says"),
    ("no_manifest", "not a cache"),
    ("foreign_manifest", "is missing"),  # another build's manifest: its part files are not these
])
def test_damage_is_named_and_nothing_is_deleted(built, tmp_path, damage, needle, cli):
    cfg, m = built
    root = str(tmp_path / "copy")
    shutil.copytree(os.path.join(cfg.run.out_dir, "cache"), root)
    part = os.path.join(root, m["files"][1]["path"])
    man = os.path.join(root, "manifest.json")
    if damage == "truncate":
        os.truncate(part, 100)
    elif damage == "delete":
        os.remove(part)
    elif damage == "stray":
        open(os.path.join(root, "views", "view=1", "extra.parquet"), "wb").write(b"x")
    elif damage == "manifest_json":
        open(man, "a").write("}")
    elif damage in ("manifest_schema", "manifest_v1", "manifest_edit", "foreign_manifest"):
        d = json.load(open(man))
        if damage == "manifest_schema":
            d["schema_version"] = 99
        elif damage == "manifest_v1":  # a cache of the first layout: its rows at the top
            d["schema_version"] = 1
        elif damage == "manifest_edit":
            d["files"][1]["bytes"] += 1
        else:  # the same layout written by another build: other part-file names, another fingerprint
            d["fingerprint"] = "f" * 64
            for f in d["files"]:
                f["path"] = f["path"].replace(".parquet", "-other.parquet")
        json.dump(d, open(man, "w"))
    else:
        os.remove(man)
    before = _listing(root)
    with pytest.raises(CacheError, match=needle):
        Cache(root)
    code, _, err = cli("inspect", root)
    assert code == 2 and err.startswith("raykd: error:") and "Traceback" not in err
    if damage in ("truncate", "delete", "manifest_edit"):
        assert os.path.basename(part) in err
    assert _listing(root) == before


def test_flipped_byte_found_by_verify(built, tmp_path):
    cfg, m = built
    root = str(tmp_path / "copy")
    shutil.copytree(os.path.join(cfg.run.out_dir, "cache"), root)
    part = os.path.join(root, m["files"][0]["path"])
    data = bytearray(open(part, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(part, "wb").write(bytes(data))
    Cache(root)  # the cheap check on open sees the right size
    with pytest.raises(CacheError, match=f"{os.path.basename(part)} does not match its sha256"):
        inspect_cache(root, verify=True)


def test_inspect_reports_accuracy_and_bytes(built):
    cfg, m = built
    text = inspect_cache(os.path.join(cfg.run.out_dir, "cache"), verify=True)
    assert "verified" in text and "ensemble" in text and "feat.b.stage3" in text
    for t in m["teachers"]:
        assert t["name"] in text


def test_int8_features_reconstruct_within_tolerance():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(16, 32, 4, 4)) * 3
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (16,)
    err = (dequantize_int8(q, s) - x).abs().amax(dim=(1, 2, 3))
    # at most half a quantisation step per element: max|x| / 254 per row
    assert (err <= x.abs().amax(dim=(1, 2, 3)) / 254 + 1e-6).all()


def test_s3_round_trip(built, s3_endpoint):
    """build -> read -> inspect against a real S3 endpoint (moto's server on 127.0.0.1)."""
    import boto3
    import s3fs

    cfg, m = built
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raykd-test")
    s3fs.S3FileSystem.clear_instance_cache()
    uri = "s3://raykd-test/caches/digits"
    m3 = build_cache(digits_cfg(cfg.run.out_dir, f"cache.uri={uri}"))
    assert m3["fingerprint"] == m["fingerprint"] and m3["rows"] == m["rows"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert fs.exists("raykd-test/caches/digits/manifest.json")
    assert fs.exists("raykd-test/caches/digits/views/view=1")
    cache = Cache(uri).expect(teachers=["a", "b"], views=2)
    cache.verify()
    assert cache.view_dataset(0, columns=["sample_id"]).count() == m["rows"] // 2
    cols = ["sample_id", "view_id", "logits.a", "feat.b.stage3"]
    local, remote = Cache(os.path.join(cfg.run.out_dir, "cache")).read_table(cols), cache.read_table(cols)
    key = lambda t: np.lexsort((column_array(t, "sample_id"), column_array(t, "view_id")))  # noqa: E731
    for c in cols[2:]:
        np.testing.assert_array_equal(column_array(local, c)[key(local)], column_array(remote, c)[key(remote)])
    text = inspect_cache(uri, verify=True)
    assert "ensemble" in text and uri in text
    # the rerun against S3 reuses the cache
    assert build_cache(digits_cfg(cfg.run.out_dir, f"cache.uri={uri}"))["created"] == m3["created"]
    with pytest.raises(CacheError, match="not a cache"):
        Cache("s3://raykd-test/nothing-here")


def test_killed_driver_then_rerun_completes_each_row_once(built, tmp_path, digits):
    """Kill the driver (SIGKILL) after it committed view 0 of 3; the rerun keeps view 0 and builds the rest."""
    import signal

    cfg, _ = built
    uri = str(tmp_path / "killed")
    extra = [f"cache.uri={uri}", "cache.views=3", "cache.views_per_pass=1"]
    proc, _ = build_until_view_0(cfg, tmp_path, extra)
    marker = os.path.join(uri, "_views", "view=0.json")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not os.path.exists(os.path.join(uri, "manifest.json"))
    kept = json.load(open(marker))

    m = build_cache(digits_cfg(cfg.run.out_dir, *extra))
    n = len(digits.train)
    assert m["rows"] == 3 * n
    t = Cache(uri).read_table(["sample_id", "view_id"])
    pairs = set(zip(column_array(t, "sample_id").tolist(), column_array(t, "view_id").tolist()))
    assert len(pairs) == t.num_rows == 3 * n
    assert [f for f in m["files"] if f["path"].startswith("views/view=0/")] == kept["files"]  # view 0 was not rebuilt
    assert not os.path.exists(os.path.join(uri, "_build.json")) and not os.path.exists(os.path.join(uri, "_build.lock"))


def test_student_on_a_cache_being_built_gets_the_rows_of_the_finished_cache(built, tmp_path, capsys):
    """`raykd distill` beside a running `raykd cache`: it starts once view 0 is committed, waits for each
    later view as its epoch comes, and trains exactly as it does on the finished cache."""
    from raykd.pipeline.stages.students import run_distill

    cfg, _ = built
    uri = str(tmp_path / "growing")
    extra = [f"cache.uri={uri}", "cache.views=3"]
    proc, log = build_until_view_0(cfg, tmp_path, extra)
    student = ["method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=3"]
    try:
        capsys.readouterr()
        early = run_distill(digits_cfg(cfg.run.out_dir, *extra, *student, "distill.name=early"))
        out = capsys.readouterr().out
        assert "waiting for the build under way to commit view" in out, out[-2000:]
        assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    finally:
        proc.kill()
    late_cfg = digits_cfg(cfg.run.out_dir, *extra, *student, "distill.name=late")
    late = run_distill(late_cfg)
    early_m = [json.loads(x) for x in open(os.path.join(cfg.run.out_dir, "students", "early", "metrics.jsonl"))]
    late_m = [json.loads(x) for x in open(os.path.join(cfg.run.out_dir, "students", "late", "metrics.jsonl"))]
    assert [m["view"] for m in early_m] == [0, 1, 2] and [m["samples"] for m in early_m] == [m["samples"] for m in late_m]
    assert [m["train_loss"] for m in early_m] == [m["train_loss"] for m in late_m]
    assert early["fingerprint"] == late["fingerprint"] and early["test_acc"] == late["test_acc"]


def test_a_build_that_fails_ends_the_student_on_it_with_its_error(built, tmp_path, monkeypatch):
    """The build fails writing view 1 while a student trains on view 0: the student stops with that error."""
    import threading

    import raykd.pipeline.cache.build as build_mod
    from raykd.pipeline.stages.students import run_distill

    cfg, _ = built
    uri = str(tmp_path / "failing")
    extra = [f"cache.uri={uri}", "cache.views=2"]
    import glob

    saved = os.path.join(cfg.run.out_dir, "ray_train", "student-doomed-*", "latest.json")  # its epoch checkpoints
    real, calls = build_mod.describe_files, []

    def describe_or_fail(fs, root, folder):
        calls.append(folder)
        if len(calls) == 1:
            return real(fs, root, folder)
        deadline = time.time() + 120  # view 1: once the student has trained its first epoch, on view 0
        while not glob.glob(saved) and time.time() < deadline:
            time.sleep(0.1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_mod, "describe_files", describe_or_fail)
    failed = {}

    def build():
        try:
            build_cache(digits_cfg(cfg.run.out_dir, *extra))
        except OSError as e:
            failed["build"] = e

    th = threading.Thread(target=build)
    th.start()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(uri, "_views", "view=0.json")) and th.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    try:
        with pytest.raises(RaykdError, match=r"failing: the cache build failed: OSError: \[Errno 28\] No space left on dev"):
            run_distill(digits_cfg(cfg.run.out_dir, *extra, "method.name=kd", "distill.student.arch=cnn4",
                                   "distill.optim.epochs=2", "distill.name=doomed"))
    finally:
        th.join(timeout=120)
    (latest,) = glob.glob(saved)
    assert "build" in failed and json.load(open(latest))["epoch"] == 1  # it trained on view 0, then stopped
    assert not os.path.exists(os.path.join(uri, "manifest.json"))
    assert os.path.exists(os.path.join(uri, "_views", "view=0.json"))  # kept for the rerun


def _two_builds_at_once(fs, root):
    """Two builds taking the lock of one cache together (threads, a barrier); the one that gets it holds it a
    while, so the other's attempt can land at any point of the first's hold."""
    import threading

    from raykd.pipeline.cache import BuildLock

    barrier, results = threading.Barrier(2), {}

    def take(name):
        barrier.wait()
        try:
            with BuildLock(fs, root, root, settle_s=0.2):
                results[name] = "built"
                time.sleep(0.5)
        except CacheError as e:
            results[name] = str(e)

    threads = [threading.Thread(target=take, args=(n,)) for n in "ab"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_build_lock_only_one_of_two_simultaneous_builds(tmp_path):
    """The lock is created atomically (link(2) on local disk): of two builds, one goes on, the other refuses
    naming it."""
    import fsspec

    fs, root = fsspec.filesystem("file"), str(tmp_path / "c")
    fs.makedirs(root, exist_ok=True)
    for _ in range(5):  # the two attempts interleave differently each time
        results = _two_builds_at_once(fs, root)
        assert sorted(v == "built" for v in results.values()) == [False, True], results
        assert "another build of this cache is running" in next(v for v in results.values() if v != "built")
        assert not os.path.exists(os.path.join(root, "_build.lock"))  # the winner finished: no lock left


def test_build_lock_on_s3_is_a_conditional_put(s3_endpoint):
    """On S3 the lock is a PUT with If-None-Match: * (moto's server honours it, as S3 does): the second
    create of the same key fails, and of two builds one goes on."""
    import boto3
    import s3fs

    from raykd.pipeline.cache.storage import create_json

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raykd-lock")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert create_json(fs, "raykd-lock/x/_build.lock", {"a": 1}) is True
    assert create_json(fs, "raykd-lock/x/_build.lock", {"a": 2}) is False
    assert json.loads(fs.cat("raykd-lock/x/_build.lock")) == {"a": 1}
    results = _two_builds_at_once(fs, "raykd-lock/c")
    assert sorted(v == "built" for v in results.values()) == [False, True], results
    assert not fs.exists("raykd-lock/c/_build.lock")


def test_a_live_build_is_refused_a_dead_one_taken_over(tmp_path):
    import socket

    import fsspec

    from raykd.pipeline.cache import BuildLock, owner_alive

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fresh, stale = time.time(), time.time() - 3600
    assert owner_alive({"owner": {"host": here, "pid": os.getpid()}, "heartbeat": fresh})
    assert owner_alive({"owner": {"host": "elsewhere", "pid": 1}, "heartbeat": fresh})
    assert not owner_alive({"owner": {"host": here, "pid": dead.pid}, "heartbeat": fresh})  # died here: at once
    assert not owner_alive({"owner": {"host": "elsewhere", "pid": 1}, "heartbeat": stale})  # silent too long
    fs, root = fsspec.filesystem("file"), str(tmp_path / "c")
    fs.makedirs(root, exist_ok=True)
    lock = os.path.join(root, "_build.lock")
    json.dump({"token": "t1", "owner": {"host": here, "pid": os.getpid()}, "heartbeat": fresh}, open(lock, "w"))
    with pytest.raises(CacheError, match=rf"another build of this cache is running \(pid {os.getpid()} on"):
        BuildLock(fs, root, root).__enter__()
    json.dump({"token": "t2", "owner": {"host": here, "pid": dead.pid}, "heartbeat": fresh}, open(lock, "w"))
    with BuildLock(fs, root, root) as taken:  # the dead build's lock is taken over
        assert json.load(open(lock))["token"] == taken.rec["token"]
    assert os.listdir(root) == []  # released, and the takeover's marker is gone


def test_two_builds_of_one_uri_at_once(built, tmp_path, digits):
    """Two `raykd cache` processes on one URI: one builds it, the other refuses (exit 2) naming the other
    build; the cache is whole, each (sample, view) row once. (Local builds, in batches of one row: the
    winner holds the lock for seconds, longer than the two processes' start-ups differ.)"""
    cfg, _ = built
    uri = str(tmp_path / "twice")
    argv = [sys.executable, "-m", "raykd", "cache", f"run.out_dir={cfg.run.out_dir}", "run.device=cpu", TEACHERS,
            "teachers.optim.epochs=2", "cache.views=2", "cache.batch_size=1", f"cache.uri={uri}"]
    logs = [open(tmp_path / f"driver{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT) for log in logs]
    codes = [p.wait(timeout=300) for p in procs]
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
    assert sorted(codes) == [0, 2], (codes, [o[-2000:] for o in out])
    loser = out[codes.index(2)]
    assert "another build of this cache" in loser and "Traceback" not in loser
    Cache(uri).verify()
    t = Cache(uri).read_table(["sample_id", "view_id"])
    pairs = set(zip(column_array(t, "sample_id").tolist(), column_array(t, "view_id").tolist()))
    assert len(pairs) == t.num_rows == 2 * len(digits.train)
    assert not os.path.exists(os.path.join(uri, "_build.json")) and not os.path.exists(os.path.join(uri, "_build.lock"))


def test_teacher_actor_killed_mid_build(built, ray_session, tmp_path, digits, capsys):
    """SIGKILL one teacher's actor while it works (a Ray Data build): Ray Data restarts it and retries its
    batches; the build completes with every (sample, view) row exactly once, and its progress never passes
    100 %."""
    import re
    import signal
    import threading

    cfg, _ = built
    uri = str(tmp_path / "actor_killed")
    c = digits_cfg(cfg.run.out_dir, f"cache.uri={uri}", "cache.views=6", "cache.batch_size=16", "cache.engine=ray")
    result = {}

    def build():
        try:
            result["manifest"] = build_cache(c)
        except Exception as e:  # surfaced by the asserts below
            result["error"] = e

    th = threading.Thread(target=build)
    th.start()
    killed, seen, deadline = None, {}, time.time() + 180
    while th.is_alive() and killed is None and time.time() < deadline:
        for a in ray_session._private.state.actors().values():
            if "TeacherForward" in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid"):
                seen.setdefault(a["ActorID"], time.time())
                if time.time() - seen[a["ActorID"]] > 0.3:  # it has been working for a moment
                    os.kill(a["Pid"], signal.SIGKILL)
                    killed = a
                    break
        time.sleep(0.05)
    th.join(timeout=300)
    assert killed is not None, "no teacher actor was seen alive"
    assert "error" not in result, result.get("error")
    m = result["manifest"]
    assert m["rows"] == 6 * len(digits.train)
    t = Cache(uri).read_table(["sample_id", "view_id"])
    pairs = set(zip(column_array(t, "sample_id").tolist(), column_array(t, "view_id").tolist()))
    assert len(pairs) == t.num_rows == 6 * len(digits.train)
    Cache(uri).verify()
    shares = [int(p) for ln in capsys.readouterr().out.splitlines() if ln.startswith("[cache] views")
              for p in re.findall(r" (\d+)%", ln)]
    assert shares and max(shares) == 100  # a retried batch is counted once


def test_credentials_never_written_or_printed(built, s3_endpoint, tmp_path, capfd, monkeypatch):
    """A cache built on S3 and inspected with distinctive credentials in the environment: the key id and
    secret appear in no file written (bucket and local outputs, the resolved config included) and in
    nothing printed. (Students write the same kinds of files: resolved config, records.)"""
    import boto3
    import s3fs

    from raykd.pipeline.cli import main as cli_main

    key, secret = "AKIDRAYKDZZ9TEST0001", "raykd-secret-zz9-never-logged"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raykd-creds")
    cfg0, _ = built
    out = tmp_path / "out"
    shutil.copytree(os.path.join(cfg0.run.out_dir, "teachers"), out / "teachers")
    extra = ["cache.uri=s3://raykd-creds/c", f"cache.s3_endpoint={s3_endpoint}"]
    build_cache(digits_cfg(str(out), *extra))
    assert cli_main(["inspect", "s3://raykd-creds/c", "--s3-endpoint", s3_endpoint, "--verify"]) == 0
    printed = capfd.readouterr()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    blobs = {p: fs.cat(p) for p in fs.find("raykd-creds/c")}
    blobs.update({str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert any(p.endswith("manifest.json") for p in blobs) and any(p.endswith("config.resolved.yaml") for p in blobs)
    for needle in (key, secret):
        assert needle not in printed.out + printed.err
        assert not [p for p, b in blobs.items() if needle.encode() in b]


def test_a_first_layout_cache_at_the_uri_says_how_to_rebuild(built, tmp_path):
    cfg, _ = built
    root = str(tmp_path / "old")
    shutil.copytree(os.path.join(cfg.run.out_dir, "cache"), root)
    man = os.path.join(root, "manifest.json")
    d = json.load(open(man))
    json.dump({**d, "schema_version": 1, "fingerprint": "f" * 64}, open(man, "w"))  # layout 1 had its own fingerprints
    before = _listing(root)
    with pytest.raises(CacheError, match=r"another layout \(schema_version 1, the first\): rebuild it here with --overwrite"):
        build_cache(digits_cfg(cfg.run.out_dir, f"cache.uri={root}"))
    assert _listing(root) == before


def test_crop_views_store_records_and_replay(ray_session, tmp_path, digits):
    """random_resized_crop views: by default the cache keeps the records (box + flip), not the pixels
    (FKD's layout); the teacher's cached logits are those of the replayed crop, and a student trains
    from the records, rendering each crop in its worker."""
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.views import ViewPolicy
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.optim.epochs=3",
                             "teachers.models=[{name: a, arch: cnn8, seed: 1}]", "cache.views=2",
                             "data.view_policy=random_resized_crop", "data.crop_scale=[0.35, 1.0]",
                             "distill.optim.epochs=2", "method.name=kd"])
    run_teachers(cfg)
    m = build_cache(cfg)
    assert m["store_views"] is False and m["policy"]["kind"] == "random_resized_crop"
    assert "pixels" not in m["columns"] and {"view_x", "view_y", "view_w", "view_h", "view_flip"} <= set(m["columns"])
    t = Cache(os.path.join(cfg.run.out_dir, "cache")).read_table()
    rows = np.random.default_rng(0).choice(t.num_rows, 40, replace=False)
    pos = np.searchsorted(digits.train.ids, column_array(t, "sample_id")[rows])
    policy = ViewPolicy(**m["policy"])
    replay = policy.render(digits.train.images[pos], {k: column_array(t, f"view_{k}")[rows] for k in policy.record})
    model, _ = load_teacher(cfg.run.out_dir, "a")
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(replay), digits.mean, digits.std))
    cached = torch.from_numpy(column_array(t, "logits.a")[rows].astype(np.float32))
    torch.testing.assert_close(cached, logits, rtol=2e-3, atol=2e-3)
    rec = run_distill(cfg)
    assert rec["test_acc"] > 0.3  # 10 classes; two epochs from replayed crops


def _assert_cache_renders(cfg, m, eager):
    """The K=2 cache of `cfg` holds every training sample of `eager` (its images in memory) once per view,
    with the view records and pixels those images render to."""
    from raykd.pipeline.data.views import make_views

    t = Cache(os.path.join(cfg.run.out_dir, "cache")).read_table()
    ids, vids = column_array(t, "sample_id"), column_array(t, "view_id")
    assert m["rows"] == 2 * len(eager.train) and sorted(set(ids.tolist())) == sorted(eager.train.ids.tolist())
    pos = np.searchsorted(eager.train.ids, ids)
    for v in (0, 1):
        rows = vids == v
        want, rec = make_views(eager.train.images[pos[rows]], ids[rows], v, cfg.data.seed, eager.policy)
        np.testing.assert_array_equal(column_array(t, "pixels")[rows], want)
        np.testing.assert_array_equal(column_array(t, "view_ox")[rows], rec["ox"])


def test_streamed_folder_cache_equals_in_memory(ray_session, digit_folder, tmp_path):
    """A streamed image folder is decoded by Ray Data tasks (the driver holds paths): its cache has the same
    rows and pixels as the folder decoded into memory, and a student trains from it."""
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    base = [f"run.out_dir={tmp_path / 'run'}", "run.device=cpu", "data.name=imagefolder", f"data.root={digit_folder}",
            "data.image_size=16", "data.val_fraction=0.2", "teachers.optim.epochs=1",
            "teachers.models=[{name: a, arch: cnn4, seed: 1}]", "cache.views=2", "distill.optim.epochs=1"]
    cfg = load_config(None, base)
    run_teachers(cfg)
    m = build_cache(cfg)
    eager = load_splits(cfg.data.model_copy(update={"in_memory": True}))
    _assert_cache_renders(cfg, m, eager)
    rec = run_distill(cfg)
    assert 0 <= rec["test_acc"] <= 1 and rec["epochs"] == 1


@pytest.mark.parametrize("source", ["webdataset", "parquet"])
def test_shards_cache_as_the_folder_does(ray_session, digit_folder, tmp_path, source):
    """Tar shards or Parquet files of the folder's JPEGs, streamed: the cache holds the same view records
    and pixels as the folder's images rendered in memory."""
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.shards import write_parquet_shards, write_tar_shards
    from raykd.pipeline.data.splits import load_splits

    (write_tar_shards if source == "webdataset" else write_parquet_shards)(digit_folder, tmp_path / "wds")
    base = [f"run.out_dir={tmp_path / 'run'}", "run.device=cpu", f"data.name={source}", f"data.root={tmp_path / 'wds'}",
            "data.image_size=16", "data.val_fraction=0.2", "teachers.optim.epochs=1",
            "teachers.models=[{name: a, arch: cnn4, seed: 1}]", "cache.views=2"]
    cfg = load_config(None, base)
    from raykd.pipeline.stages.teachers import run_teachers

    run_teachers(cfg)
    m = build_cache(cfg)
    eager = load_splits(cfg.data.model_copy(update={"name": "imagefolder", "root": str(digit_folder), "in_memory": True}))
    _assert_cache_renders(cfg, m, eager)


FAULTS = """
import json, resource, sys
import torch
from raykd.pipeline.cache.passes import retain_freed_memory
from raykd.pipeline.models.zoo import build_model
applied = retain_freed_memory() if sys.argv[1] == "on" else None
torch.manual_seed(0)
model, x = build_model("resnet8", 10, 1).eval(), torch.randn(256, 1, 28, 28)
with torch.inference_mode():
    for _ in range(2):  # the first batches fault the heap in
        model.forward_stages(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        logits, stages = model.forward_stages(x)
        kept = logits.half().numpy()  # a small allocation that outlives the batch, as the cache's rows do
print(json.dumps({"applied": applied, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_teacher_forward_does_not_fault_its_activations_in_every_batch():
    """retain_freed_memory (set by every TeacherForward) keeps freed activations in the heap: a forward then
    faults a fraction of the pages it did in every batch; without it glibc gives the freed activations back
    to the kernel and faults them in again, batch after batch (the cache build's ~20 % gap to a bare loop)."""
    def faults(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])

    on, off = faults("on"), faults("off")
    assert on["applied"] is True
    # pages faulted per batch after the first two: ~3,500-5,500 with the setting, ~15,000-30,000 without
    # (measured here; in `raykd cache` of resnet20 at batch 512, 6.2 M faults in all without it, 0.25 M with)
    assert off["faults"] > 2.5 * on["faults"], (on, off)
