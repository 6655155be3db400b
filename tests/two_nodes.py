"""Run by tests/test_multinode.py in its own process: a two-node Ray cluster on this machine (Ray's own
`ray.cluster_utils.Cluster`: two raylets), then teachers, a cache on S3 and a 2-worker distillation with
Ray Train's storage on S3, connected with `ray.address` as on a real cluster. Prints one JSON line:
where every actor ran, and the student's record.

    python tests/two_nodes.py OUT_DIR s3://bucket/prefix     (S3 endpoint and keys from the environment)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20


def main() -> None:
    out, prefix = sys.argv[1], sys.argv[2].rstrip("/")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "object_store_memory": 150 * MiB, "include_dashboard": False})
    cluster.add_node(num_cpus=3, object_store_memory=150 * MiB)
    cluster.wait_for_nodes()

    try:
        run(cluster.address, out, prefix)
    finally:  # `ray start --head` (which the Cluster does) leaves its address for later ray.init() calls: drop it
        ray.shutdown()
        cluster.shutdown()
        current = "/tmp/ray/ray_current_cluster"
        if os.path.exists(current) and open(current).read().strip() == cluster.address:
            os.remove(current)


def run(address: str, out: str, prefix: str) -> None:
    import ray

    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    cfg = load_config(None, [
        f"ray.address={address}", f"run.out_dir={out}", "run.device=cpu",
        f"cache.uri={prefix}/cache", f"run.storage_path={prefix}/ray_train",
        "teachers.models=[{name: a, arch: cnn4, seed: 1}, {name: b, arch: cnn8, seed: 2}]",
        "teachers.optim.epochs=2", "cache.views=2",
        "method.name=kd", "distill.student.arch=cnn4", "distill.optim.epochs=3",
        "distill.workers.num_workers=2", "distill.workers.placement=STRICT_SPREAD", "distill.workers.torch_threads=1",
    ])
    run_teachers(cfg)
    manifest = build_cache(cfg)
    rec = run_distill(cfg)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    actors: dict[str, set] = {}
    for a in ray._private.state.actors().values():  # GCS's actor table (dead actors included); no dashboard needed
        actors.setdefault(a["ActorClassName"], set()).add(a["Address"]["NodeID"])
    print("RESULT " + json.dumps({
        "nodes": nodes, "actors": {k: sorted(v) for k, v in actors.items()},
        "rows": manifest["rows"], "train_samples": manifest["dataset"]["train_samples"], "test_acc": rec["test_acc"], "epochs": rec["epochs"],
    }), flush=True)


if __name__ == "__main__":
    main()
