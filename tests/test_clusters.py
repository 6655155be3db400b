"""clusters/: the `ray up` configs pass Ray's own checks, the KubeRay manifests carry what the operator needs,
the raykd keys and commands they mention exist, and no file holds a credential. Starts no Ray and no cluster.

Launcher configs go through what `ray up` runs before it talks to a cloud: jsonschema against the
ray-schema.json shipped in the ray package, then ray.autoscaler._private.util.prepare_config (merges the
provider's defaults.yaml, fills per-type min/max workers; for `local`, builds the single node type from
head_ip/worker_ips) and validate_config. In Ray 2.60 all three work offline for aws, gcp and local: they
read the package's defaults.yaml files and import no boto3 or googleapiclient (only `ray up`'s later
bootstrap step does). Private API: the ray pin in pyproject.toml keeps it stable.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHERS = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
ALL_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file())
IMAGE_RE = re.compile(r"^rayproject/ray:2\.60\.\d+-py311-(cpu|gpu)$")
SECTIONS = "run|ray|data|teachers|cache|professor|method|distill|sweep"
# a dotted raykd key such as cache.gpus_per_actor or teachers.workers.* (not inside a path or a URL)
KEY_RE = re.compile(rf"(?<![\w./-])((?:{SECTIONS})(?:\.[a-z0-9_]+)+)(?:\.\*)?(?![\w/-])")


def _id(p: Path) -> str:
    return str(p.relative_to(CLUSTERS))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_launcher(raw: dict) -> dict:
    """Ray's checks of a `ray up` config, plus the bounds Ray leaves out (its schema puts no minimum on a node
    type's min_workers and compares only their sum with max_workers). Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(raw, _ray_schema())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    for name, nt in prepared["available_node_types"].items():
        lo, hi = nt["min_workers"], nt["max_workers"]
        if not 0 <= lo <= hi <= prepared["max_workers"]:
            raise ValueError(f"node type {name}: need 0 <= min_workers ({lo}) <= max_workers ({hi}) "
                             f"<= the cluster's max_workers ({prepared['max_workers']})")
    return prepared


def test_the_cluster_files_are_there():
    assert [p.name for p in LAUNCHERS] == ["aws.yaml", "gcp.yaml", "onprem.yaml"]
    assert [p.name for p in KUBERAY] == ["raycluster.yaml", "rayjob.yaml"]
    assert (CLUSTERS / "README.md").is_file()


# ----------------------------------------------------------------------------------------------------------
# `ray up` configs


@pytest.mark.parametrize("path", LAUNCHERS, ids=_id)
def test_launcher_passes_rays_schema_and_validation(path):
    raw = _load(path)
    assert raw["cluster_name"].startswith("raykd-")
    validate_launcher(raw)


@pytest.mark.parametrize("path", LAUNCHERS, ids=_id)
def test_launcher_declares_gpu_workers_within_bounds(path):
    raw = _load(path)
    prepared = validate_launcher(raw)
    if raw["provider"]["type"] == "local":
        # Ray's local provider refuses available_node_types (prepare_local aborts): each worker IP is one
        # node offering what `ray start` detects there. So: every IP joins, one GPU image for all, and no
        # start command hides the GPUs.
        assert "available_node_types" not in raw
        (node,) = prepared["available_node_types"].values()
        n = len(raw["provider"]["worker_ips"])
        assert 0 < node["min_workers"] <= node["max_workers"] == n
        assert raw["docker"]["image"].endswith("-gpu")
        assert not any(re.search(r"--num-gpus[= ]+0\b", c) for c in raw["worker_start_ray_commands"])
        return
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) > 0}
    assert gpu, "no worker node type with GPU > 0 in its resources"
    for name, t in gpu.items():
        # min_workers >= 1: with no GPU in the cluster when the driver starts, run.device=auto means cpu
        # and run.device=cuda is refused
        assert 1 <= t["min_workers"] <= t["max_workers"], name
        assert t["docker"]["worker_image"].endswith("-gpu"), name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= raw["max_workers"]
    assert sum(t.get("max_workers", 0) for name, t in types.items() if name != head) <= raw["max_workers"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=_id)
def test_launcher_ships_installs_and_starts_raykd(path):
    raw = _load(path)
    assert raw["file_mounts"]["~/raykd"] == "."
    assert ".gitignore" in raw["rsync_filter"], ".venv/ and runs/ must not be shipped"
    assert any(re.search(r"pip install .*-e ~/raykd\b", c) for c in raw["setup_commands"])
    images = [raw["docker"]["image"]] + [t["docker"]["worker_image"] for t in
                                        raw.get("available_node_types", {}).values() if "docker" in t]
    assert all(IMAGE_RE.match(i) for i in images), images
    head = " ".join(raw["head_start_ray_commands"])
    assert "ray start" in head and "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(raw["worker_start_ray_commands"])


def test_onprem_uses_documentation_addresses():
    provider = _load(CLUSTERS / "onprem.yaml")["provider"]
    assert all(ip.startswith("192.0.2.") for ip in [provider["head_ip"], *provider["worker_ips"]])


def _break(raw: dict, how: str) -> None:
    gpu = next(t for t in raw["available_node_types"].values() if t["resources"].get("GPU"))
    if how == "unknown top-level key":
        raw["min_worker"] = 1
    elif how == "min_workers -1":
        gpu["min_workers"] = -1
    elif how == "min_workers above max_workers":
        gpu["min_workers"] = gpu["max_workers"] + 1
    elif how == "fractional GPU resource":
        gpu["resources"]["GPU"] = 0.5
    elif how == "unknown head node type":
        raw["head_node_type"] = "ray.head.missing"


@pytest.mark.parametrize("how, error, match", [
    ("unknown top-level key", jsonschema.ValidationError, "min_worker"),
    ("min_workers -1", ValueError, r"min_workers \(-1\)"),
    ("min_workers above max_workers", ValueError, "min_workers"),
    ("fractional GPU resource", jsonschema.ValidationError, "integer"),
    ("unknown head node type", ValueError, "head_node_type"),
])
def test_a_broken_copy_is_refused(tmp_path, how, error, match):
    raw = _load(CLUSTERS / "aws.yaml")
    _break(raw, how)
    broken = tmp_path / "aws.yaml"
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(error, match=match):
        validate_launcher(_load(broken))


# ----------------------------------------------------------------------------------------------------------
# KubeRay


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_doc(path: Path) -> dict:
    (doc,) = [d for d in _docs(path) if d["apiVersion"].startswith("ray.io/")]
    return doc


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def check_ray_cluster_spec(spec: dict) -> None:
    """The fields KubeRay needs in a RayCluster spec (or a RayJob's rayClusterSpec), as AssertionErrors."""
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert IMAGE_RE.match(head["template"]["spec"]["containers"][0]["image"])
    groups = spec["workerGroupSpecs"]
    assert groups, "no workerGroupSpecs"
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"worker group {g.get('groupName')!r} lacks {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        assert IMAGE_RE.match(g["template"]["spec"]["containers"][0]["image"]), g["groupName"]
    def first(g):
        return g["template"]["spec"]["containers"][0]

    gpu = [g for g in groups if int(first(g).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0]
    assert gpu, "no worker group with an nvidia.com/gpu limit"
    # minReplicas >= 1: a GPU is up when the driver starts (run.device auto/cuda)
    assert all(g["minReplicas"] >= 1 and first(g)["image"].endswith("-gpu") for g in gpu)
    version = spec["rayVersion"]
    for pod in _pod_specs(spec):
        for c in pod["containers"]:
            assert c["image"].split(":")[1].startswith(version + "-"), (version, c["image"])


@pytest.mark.parametrize("path", KUBERAY, ids=_id)
def test_kuberay_manifest_has_what_kuberay_requires(path):
    doc = _ray_doc(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
    else:
        assert doc["kind"] == "RayJob"
        assert isinstance(doc["spec"]["entrypoint"], str) and doc["spec"]["entrypoint"].startswith("raykd ")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"]
        spec = doc["spec"]["rayClusterSpec"]
    check_ray_cluster_spec(spec)
    # every claim a pod mounts is declared in the same file
    claims = {v["persistentVolumeClaim"]["claimName"] for pod in _pod_specs(spec) for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    declared = {d["metadata"]["name"] for d in _docs(path) if d["kind"] == "PersistentVolumeClaim"}
    assert claims <= declared


def test_a_worker_group_without_max_replicas_is_refused():
    spec = copy.deepcopy(_ray_doc(CLUSTERS / "kuberay" / "raycluster.yaml")["spec"])
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(AssertionError, match="lacks maxReplicas"):
        check_ray_cluster_spec(spec)


def _env_lists(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                yield v
            else:
                yield from _env_lists(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_lists(v)


@pytest.mark.parametrize("path", KUBERAY, ids=_id)
def test_kuberay_credentials_come_from_secrets(path):
    envs = [e for doc in _docs(path) for env in _env_lists(doc) for e in env]
    creds = [e for e in envs if re.search(r"AWS_|SECRET|TOKEN|PASSWORD", e["name"])]
    assert {e["name"] for e in creds} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for e in creds:
        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]


# ----------------------------------------------------------------------------------------------------------
# raykd keys and commands named in clusters/


def _config_has(key: str) -> bool:
    from pydantic import BaseModel

    from raykd.pipeline.core.config import Config

    model = Config
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return True  # a leaf (or a dict such as cache.layers): what follows is data
        model = field.annotation
    return True


@pytest.mark.parametrize("path", [p for p in ALL_FILES if p.suffix in (".yaml", ".md")], ids=_id)
def test_every_raykd_key_named_exists(path):
    text = path.read_text()
    node_types = set()
    if path in LAUNCHERS:
        node_types = set(_load(path).get("available_node_types", {}))
    keys = {m.group(1) for m in KEY_RE.finditer(text)} - node_types
    assert keys, "names no raykd config keys"
    unknown = sorted(k for k in keys if not _config_has(k))
    assert not unknown, f"not raykd config keys: {unknown}"


def _raykd_commands(path: Path) -> list[list[str]]:
    """`raykd run|distill|sweep|cache ...` commands in a README's code blocks or a RayJob's entrypoint."""
    if path.suffix == ".md":
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
        lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    else:
        lines = [d["spec"]["entrypoint"] for d in _docs(path) if d.get("kind") == "RayJob"]
    out = []
    for ln in lines:
        argv = shlex.split(ln, comments=True)
        starts = [i for i, a in enumerate(argv[:-1])
                  if a == "raykd" and argv[i + 1] in ("run", "distill", "sweep", "cache", "teachers")]
        out += [argv[i:] for i in starts]
    return out


@pytest.mark.parametrize("path", [CLUSTERS / "README.md", CLUSTERS / "kuberay" / "rayjob.yaml"], ids=_id)
def test_documented_commands_load_as_raykd_configs(path):
    from raykd.pipeline.core.config import load_config

    commands = _raykd_commands(path)
    assert commands
    for argv in commands:
        rest = argv[2:]
        cfg_path = rest[rest.index("-c") + 1]
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        cfg = load_config(str(ROOT / cfg_path), overrides)
        assert cfg.cache.uri.startswith("s3://") and cfg.run.storage_path.startswith("s3://"), argv
        assert cfg.run.out_dir.startswith("/"), "a submitted job's relative out_dir lands in its temporary working dir"


# ----------------------------------------------------------------------------------------------------------
# no credentials

AWS_KEY_ID_RE = re.compile(r"AKIA[0-9A-Z]{16}")
# a value after aws_secret_access_key (any case, = or :) that looks like a key, not $VAR, <...> or "..."
AWS_SECRET_RE = re.compile(r"aws_secret_access_key[\"']?[ \t]*[:=][ \t]*[\"']?([A-Za-z0-9/+=]{16,})", re.I)


def find_credentials(text: str) -> list[str]:
    return AWS_KEY_ID_RE.findall(text) + AWS_SECRET_RE.findall(text)


@pytest.mark.parametrize("path", ALL_FILES, ids=_id)
def test_no_literal_credentials(path):
    assert not find_credentials(path.read_text(errors="replace"))


def test_the_credential_scan_catches_literal_keys():
    key_id = "AKIA" + "Q" * 16
    secret = "x" * 20 + "Y" * 20
    assert find_credentials(f"aws_access_key_id = {key_id}") == [key_id]
    assert find_credentials(f"aws_secret_access_key = {secret}") == [secret]
    assert find_credentials(f'AWS_SECRET_ACCESS_KEY: "{secret}"') == [secret]
    assert not find_credentials('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')
    assert not find_credentials("aws_secret_access_key = ...\n- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:")
