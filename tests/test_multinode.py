"""Two nodes (Ray's own multi-node test utility, two raylets on this machine), the cache and Ray Train's
checkpoints on S3 (moto's server): teachers, cache build and a 2-worker distillation complete, and their
actors ran on both nodes. In its own process (tests/two_nodes.py): this session's Ray stays untouched."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_node_cluster_with_cache_and_checkpoints_on_s3(s3_endpoint, tmp_path):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="raykd-multinode")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "two_nodes.py"), str(out), "s3://raykd-multinode/run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])

    assert len(res["nodes"]) == 2
    assert res["rows"] == res["train_samples"] * 2 and res["epochs"] == 3 and res["test_acc"] > 0.15  # learned (chance: 0.10); 3 epochs, accuracy is not the point
    # the cache's teacher actors and the Train workers ran on the cluster's nodes; the two workers (STRICT_SPREAD)
    # on two different nodes
    teacher_actor_nodes = {n for cls, ns in res["actors"].items() if "TeacherForward" in cls for n in ns}
    assert teacher_actor_nodes and teacher_actor_nodes <= set(res["nodes"])
    assert set(res["actors"]["RayTrainWorker"]) == set(res["nodes"])
    assert {n for ns in res["actors"].values() for n in ns} == set(res["nodes"])

    # cache and checkpoints on S3, nothing of Ray Train's on the driver's disk; the outputs on the driver's
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert fs.exists("raykd-multinode/run/cache/manifest.json")
    runs = fs.ls("raykd-multinode/run/ray_train")
    assert any(p.rsplit("/", 1)[-1].startswith("student-kd-") for p in runs), runs
    assert any(p.rsplit("/", 1)[-1].startswith("teacher-a-") for p in runs), runs
    student_run = next(p for p in runs if p.rsplit("/", 1)[-1].startswith("student-kd-"))
    assert any("checkpoint_" in p for p in fs.find(student_run)), "no checkpoint of the student on S3"
    assert not (out / "ray_train").exists() and not (out / "cache").exists()
    assert (out / "students").is_dir() and any((out / "students").glob("*/student.safetensors"))
