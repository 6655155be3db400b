"""Failures that name their cause: a cache part damaged after the build, an error in a method's code, the
log folder of the session in use, a cluster that wants a token, and the built-in defaults said aloud."""

import json
import os
import shutil

import pytest
from conftest import TEACHERS

from raykd.pipeline.harness.raysetup import connection_message

pytestmark = pytest.mark.timeout(400)

BASE = ["run.device=cpu", TEACHERS, "teachers.optim.epochs=2", "cache.views=2", "cache.layers={b: [stage2, stage3]}"]


def _listing(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_a_part_damaged_after_the_build_is_named_and_repaired(built, tmp_path, cli, in_memory):
    """64 bytes overwritten inside a part of view 0 (its size unchanged, so opening the cache passes):
    the student's job names the file and the commands that list and mend the damage, is not retried and
    deletes nothing; `raykd cache --repair` rebuilds that view only, and the student then trains."""
    cfg, m = built
    uri = str(tmp_path / "cache")
    shutil.copytree(os.path.join(cfg.run.out_dir, "cache"), uri)
    part = next(f["path"] for f in m["files"] if f["path"].startswith("views/view=0/"))
    with open(os.path.join(uri, part), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(uri, part)) // 2)
        f.write(b"\xff" * 64)
    before = _listing(uri)
    args = [f"run.out_dir={cfg.run.out_dir}", *BASE, f"cache.uri={uri}"]
    student = [*args, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=1",
               f"distill.in_memory={in_memory}", "distill.workers.max_failures=2", f"distill.name=damaged-{in_memory}"]
    code, out, err = cli("distill", *student)
    lines = [ln for ln in err.splitlines() if ln.startswith("raykd: error:")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert part in lines[0] and f"raykd inspect --verify {uri}" in lines[0] and "raykd cache --repair" in lines[0]
    assert "rerun the same command" not in lines[0] and "restarting" not in out  # not retried: it would fail again
    assert _listing(uri) == before  # nothing deleted
    code, out, err = cli("cache", *args, "--repair")
    assert code == 0 and "rebuilding view(s) [0]" in out, err[-2000:]
    from raykd.pipeline.cache import Cache

    Cache(uri).verify()
    kept = [f for f in json.load(open(os.path.join(uri, "manifest.json")))["files"] if f["path"].startswith("views/view=1/")]
    assert kept == [f for f in m["files"] if f["path"].startswith("views/view=1/")]  # view 1 was not rebuilt
    code, _, err = cli("distill", *student)
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("in_process", ["true", "false"])
def test_an_error_in_code_reaches_the_console_and_is_not_retried(built, tmp_path, monkeypatch, in_process):
    """An exception from the training code (as a bug in a user's method would raise) comes back as its own
    type, message and last frames, in this process or from a Ray task, and is not retried."""
    from conftest import digits_cfg

    from raykd.pipeline.core.errors import StageFailed
    from raykd.pipeline.stages.distill import student_dir, student_record
    from raykd.pipeline.stages.students import run_distill

    cfg0, _ = built
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 1, "step": 2, "marker": str(tmp_path / "f"), "kind": "bug"}))
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=2",
                     "distill.workers.max_failures=2", f"run.in_process={in_process}", f"distill.name=bug-{in_process}")
    with pytest.raises(StageFailed) as e:
        run_distill(cfg)
    msg = str(e.value)
    assert "TypeError: injected bug at epoch 1 step 2 (at " in msg and "harness/loop.py:" in msg and "in _maybe_fail" in msg
    assert "Not retried" in msg and "rerun the same command to resume" not in msg
    assert student_record(student_dir(cfg)).read() is None


def test_a_transient_failure_names_this_sessions_log_folder(built, ray_session, tmp_path, monkeypatch):
    from conftest import digits_cfg

    from raykd.pipeline.core.errors import StageFailed
    from raykd.pipeline.harness.raysetup import logs_dir
    from raykd.pipeline.stages.students import run_distill

    logs = logs_dir()
    assert os.path.isdir(logs) and os.path.dirname(logs) == ray_session._private.worker._global_node.get_session_dir_path()
    cfg0, _ = built
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 1, "step": 1, "marker": str(tmp_path / "f"), "kind": "exit"}))
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=ce", "distill.student.arch=cnn4", "distill.optim.epochs=1",
                     "distill.workers.max_failures=0", "run.in_process=false", "distill.name=transient")
    with pytest.raises(StageFailed, match=f"rerun the same command to resume. Ray's logs: {logs}$"):
        run_distill(cfg)


STDERR_OF_A_REFUSED_DRIVER = (  # what Ray 2.60's core printed for a driver without a token (seen here)
    "[2026-11-30 14:29:29,251 W 13101 13101] gcs_client.cc:210: Failed to get cluster ID from GCS server: "
    "Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing or incorrect\n" * 3)


def test_a_cluster_that_wants_a_token_is_named(tmp_path):
    refused = ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6390")
    msg = connection_message("127.0.0.1:6390", refused, STDERR_OF_A_REFUSED_DRIVER, auth_mode="disabled",
                             token_file=str(tmp_path / "none"))
    assert "requires Ray's token authentication" in msg and "set RAY_AUTH_MODE=token" in msg
    msg = connection_message("127.0.0.1:6390", refused, STDERR_OF_A_REFUSED_DRIVER, auth_mode="token")
    assert "refused this process's authentication token" in msg
    token = tmp_path / "auth_token"
    token.write_text("x")
    msg = connection_message("127.0.0.1:6390", refused, "", auth_mode=None, token_file=str(token))
    assert msg.startswith("cannot connect to the Ray cluster at 127.0.0.1:6390 (ray.address / RAY_ADDRESS): Failed")
    assert "this machine has a token" in msg and "RAY_AUTH_MODE=token" in msg
    assert "token" not in connection_message("h:1", refused, "", auth_mode=None, token_file=str(tmp_path / "none"))


def test_rays_connection_noise_is_held_and_dropped_on_failure(capfd):
    from raykd.pipeline.harness.raysetup import _held_stderr

    with _held_stderr() as held:
        os.write(2, b"gcs_client.cc: Failed to get cluster ID\n")
        held.drop = True
    with _held_stderr() as held:
        os.write(2, b"kept on success\n")
    err = capfd.readouterr().err
    assert "Failed to get cluster ID" not in err and "kept on success" in err


def test_the_built_in_defaults_are_named_before_anything_starts(tmp_path, cli):
    code, _, err = cli("distill", f"run.out_dir={tmp_path}")
    first = err.splitlines()[0]
    assert first.startswith("raykd: no config given (-c): the built-in defaults — digits, teachers resnet8/wrn_16_2/cnn32")
    assert code == 2 and "is not a cache" in err
