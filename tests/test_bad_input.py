"""Bad input through the CLI (called in this process), table-driven: each case is one `raykd: error:` line
naming the field, file or URI at fault, exit status 2, no traceback, no hang, and nothing written outside
the run's folder, nor anything already there changed (a snapshot of the whole tree before and after)."""

import hashlib
import json
import os
import time

import pytest

DEMO = ["-c", "configs/demo.yaml"]
OUT = "run.out_dir={tmp}/out"
NO_S3 = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
         "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
         "AWS_EC2_METADATA_DISABLED": "true"}
FAKE_S3 = {**NO_S3, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
DOWN = "http://127.0.0.1:9"  # nothing listens there
BAD_FOLDER = "is not a folder name"

CASES = {  # id: (argv after `raykd`, extra env, what the message must contain)
    "unknown key in a file": (["config", "-c", "{tmp}/unknown_key.yaml"], {}, "unknown key 'distill.optim.epoch'"),
    "not a mapping": (["config", "-c", "{tmp}/list.yaml"], {}, "top level must be a mapping"),
    "missing config file": (["config", "-c", "{tmp}/nope.yaml"], {}, "nope.yaml not found"),
    "a directory as the config": (["config", "-c", "{tmp}"], {}, "{tmp} is a directory, not a YAML file"),
    "unknown key override": (["config", *DEMO, "teachers.optim.epoch=3"], {}, "unknown key 'teachers.optim.epoch'"),
    "wrong type": (["config", *DEMO, "teachers.optim.lr=fast"], {}, "'teachers.optim.lr'"),
    "negative batch size": (["distill", *DEMO, "distill.optim.batch_size=-8"], {}, "'distill.optim.batch_size'"),
    "zero workers": (["distill", *DEMO, "distill.workers.num_workers=0"], {}, "'distill.workers.num_workers'"),
    "K = 0": (["cache", *DEMO, "cache.views=0"], {}, "'cache.views'"),
    "K beyond the bound": (["cache", *DEMO, OUT, "cache.views=100000"], {}, "'cache.views': 100000 views: at most 1024"),
    "unknown model": (["distill", *DEMO, "distill.student.arch=vgg99"], {}, "unknown model 'vgg99'"),
    "unknown method": (["distill", *DEMO, "method.name=fitnet"], {}, "unknown method 'fitnet'"),
    "unknown dataset": (["teachers", *DEMO, "data.name=mnist"], {}, "unknown dataset 'mnist'"),
    "unknown device": (["config", *DEMO, "run.device=gpu"], {}, "'run.device'"),
    "unknown teacher": (["distill", *DEMO, "method.teachers=[zz]"], {}, "method.teachers names unknown teachers ['zz']"),
    "test metric for a sweep": (["sweep", *DEMO, "sweep.metric=test_acc"], {}, "'sweep.metric'"),
    "multistep option without multistep": (["config", *DEMO, "distill.optim.gamma=0.5"], {},
                                           "gamma applies only to schedule: multistep"),
    # names that would leave their folder
    "student name ..": (["distill", *DEMO, OUT, "distill.name=../teachers/resnet8"], {}, BAD_FOLDER),
    "student name into the cache": (["distill", *DEMO, OUT, "distill.name=../cache"], {}, BAD_FOLDER),
    "student name absolute": (["distill", *DEMO, OUT, "distill.name={tmp}/anywhere"], {}, BAD_FOLDER),
    "student name with a slash": (["distill", *DEMO, OUT, "distill.name=a/b"], {}, BAD_FOLDER),
    "student name .": (["distill", *DEMO, OUT, "distill.name=."], {}, BAD_FOLDER),
    "student name too long": (["distill", *DEMO, OUT, "distill.name=" + "a" * 300], {}, BAD_FOLDER),
    "sweep name ..": (["sweep", *DEMO, OUT, "sweep.name=../x"], {}, BAD_FOLDER),
    "sweep name too long for its trials": (["sweep", *DEMO, OUT, "sweep.name=" + "s" * 90], {}, "at most 80 characters"),
    "teacher name too long": (["teachers", *DEMO, OUT, "cache.layers={{}}", "teachers.models=[{{name: " + "t" * 70 +
                               ", arch: cnn4}}]"], {}, "'teachers.models.0.name'"),
    # numbers
    "seed beyond 32 bits": (["distill", *DEMO, OUT, f"run.seed={2**64}"], {}, "'run.seed': Input should be less than"),
    "negative seed": (["config", *DEMO, "data.seed=-1"], {}, "'data.seed'"),
    "infinite lr": (["distill", *DEMO, OUT, "distill.optim.lr=.inf"], {}, "'distill.optim.lr': Input should be a finite"),
    "infinite lr in `raykd config`": (["config", *DEMO, "distill.optim.lr=.inf"], {}, "'distill.optim.lr'"),
    "infinite weight decay": (["distill", *DEMO, OUT, "distill.optim.weight_decay=.inf"], {},
                              "'distill.optim.weight_decay': Input should be a finite"),
    "infinite temperature": (["distill", *DEMO, OUT, "method.kd.temperature=.inf"], {},
                             "'method.kd.temperature': Input should be a finite"),
    "nan": (["config", *DEMO, "professor.w_z=.nan"], {}, "'professor.w_z': Input should be a finite"),
    "a local Ray far beyond the machine": (["teachers", *DEMO, OUT, "ray.num_cpus=100000"], {},
                                           "'ray.num_cpus': 100000 logical CPUs"),
    # YAML
    "duplicate keys": (["config", "-c", "{tmp}/dup.yaml"], {}, "{tmp}/dup.yaml: line 3: key 'distill' is repeated"),
    "billion laughs": (["config", "-c", "{tmp}/bomb.yaml"], {}, "more than 100,000 values once its aliases"),
    "alias bomb under an unknown key": (["config", "-c", "{tmp}/bomb_unknown.yaml"], {}, "once its aliases"),
    "alias bomb in an override": (["config", *DEMO, "run.compare=[&a [" + ", ".join("x" * 10) + "], " + ", ".join(
        f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef")) + "]"], {},
        "bad override 'run.compare=[&a [x, x, x, x, x"),
    "recursive alias": (["config", "-c", "{tmp}/recursive.yaml"], {}, "an alias refers to a node that contains it"),
    # options nobody reads
    "options of a method not chosen": (["config", *DEMO, "run.compare=[]", "method.feed.beta=2"], {},
                                       "'method.feed' sets options of method feed, but method.name is kd"),
    "a compare entry with another method's options": (
        ["config", *DEMO, "run.compare=[{{method.name: kd, method.dkd.beta: 3}}]"], {},
        "run.compare.0: 'method.dkd.beta' sets options of method dkd, but this entry trains kd"),
    # user code
    "not a model factory": (["distill", *DEMO, OUT, "distill.student.arch=json:dumps"], {},
                            "'json:dumps' is not a model factory"),
    "not callable": (["distill", *DEMO, OUT, "distill.student.arch=os:sep"], {}, "os has no callable 'sep'"),
    "an import that exits": (["teachers", *DEMO, OUT, "run.imports=[raykd_test_exits]"], {},
                             "importing 'raykd_test_exits' called sys.exit(0)"),
    # where things live
    "run.out_dir under a regular file": (["teachers", *DEMO, "run.out_dir={tmp}/regular/out"], {},
                                         "run.out_dir={tmp}/regular/out: not a folder raykd can write in"),
    "run.out_dir under /proc": (["teachers", *DEMO, "run.out_dir=/proc/raykd-test"], {},
                                "run.out_dir=/proc/raykd-test: not a folder raykd can write in"),
    "endpoint not a URL": (["distill", *DEMO, OUT, "cache.uri=s3://b/c", "cache.s3_endpoint=not a url"], {},
                           "'cache.s3_endpoint': 'not a url' is not an endpoint URL"),
    "inspect endpoint not a URL": (["inspect", "s3://b/c", "--s3-endpoint", "localhost:9000"], FAKE_S3,
                                   "--s3-endpoint: 'localhost:9000' is not an endpoint URL"),
    "AWS_ENDPOINT_URL not a URL": (["inspect", "s3://b/c"], {**FAKE_S3, "AWS_ENDPOINT_URL": "not-a-url"},
                                   "AWS_ENDPOINT_URL: 'not-a-url' is not an endpoint URL"),
    # files raykd reads
    "missing data set": (["teachers", *DEMO, "data.name=fashion-mnist", "data.root={tmp}/fmnist"], {},
                         "make fashion-mnist"),
    "missing teacher checkpoint": (["teachers", *DEMO, "cache.layers={{}}", OUT,
                                    "teachers.models=[{{name: t, arch: cnn4, checkpoint: {tmp}/none.safetensors}}]"],
                                   {}, "teacher 't' (teachers.models[].checkpoint): checkpoint {tmp}/none.safetensors not found"),
    "teacher of other classes": (["teachers", *DEMO, "cache.layers={{}}", OUT,
                                  "teachers.models=[{{name: t, arch: cnn4, checkpoint: {tmp}/three.safetensors}}]"],
                                 {}, "the data set digits has 10 classes"),
    "pickled checkpoint": (["teachers", *DEMO, "cache.layers={{}}", OUT,
                            "teachers.models=[{{name: t, arch: cnn4, checkpoint: {tmp}/pickled.pt}}]"],
                           {}, "{tmp}/pickled.pt is refused: it holds pickled Python objects"),
    "a teacher record of another shape": (["teachers", *DEMO, "cache.layers={{}}", "run.out_dir={tmp}/records",
                                           "teachers.models=[{{name: t, arch: cnn4}}]"], {},
                                          "{tmp}/records/teachers/t/teacher.json: not a raykd teacher record"),
    "not a cache": (["inspect", "{tmp}/nothing"], {}, "is not a cache: no manifest.json"),
    "no cache for distill": (["distill", *DEMO, OUT], {}, "{tmp}/out/cache is not a cache"),
    "manifest a list": (["inspect", "{tmp}/manifest_list"], {},
                        "{tmp}/manifest_list/manifest.json: not a raykd cache manifest (a JSON list"),
    "manifest a string": (["inspect", "{tmp}/manifest_str"], {}, "not a raykd cache manifest (a JSON str"),
    "manifest files a string": (["inspect", "{tmp}/manifest_files"], {}, "not a raykd cache manifest (files:"),
    "manifest a list, distill": (["distill", *DEMO, OUT, "cache.uri={tmp}/manifest_list"], {},
                                 "{tmp}/manifest_list/manifest.json: not a raykd cache manifest"),
    "manifest files a string, distill": (["distill", *DEMO, OUT, "cache.uri={tmp}/manifest_files"], {},
                                         "not a raykd cache manifest (files:"),
    "a part path outside the cache": (["inspect", "{tmp}/manifest_escape"], {},
                                      "not a raykd cache manifest (files.0.path: '../../etc/passwd' is not a part file"),
    "a foreign cache, raykd cache": (["cache", *DEMO, OUT, "cache.uri={tmp}/foreign"], {},
                                     "{tmp}/foreign holds a finished cache of other inputs"),
    "a broken manifest, raykd cache": (["cache", *DEMO, OUT, "cache.uri={tmp}/manifest_files"], {},
                                       "not a raykd cache manifest (files:"),
    "unreachable bucket": (["inspect", "s3://raykd-nowhere/c", "--s3-endpoint", DOWN], FAKE_S3,
                           "s3://raykd-nowhere/c: storage not reachable (EndpointConnectionError"),
    "S3 without credentials": (["inspect", "s3://raykd-nowhere/c", "--s3-endpoint", DOWN], NO_S3,
                               "no S3 credentials found"),
}


def _manifest(views: int = 8) -> dict:
    """A manifest of the right shape (as a build writes it), of inputs no config here has."""
    part = {"path": "views/view=0/a.parquet", "rows": 10, "bytes": 100, "sha256": "0" * 64}
    return {"schema_version": 2, "fingerprint": "f" * 64, "views": views, "policy": {"pad": 1, "flip": False},
            "dataset": {"name": "digits", "fingerprint": "d" * 64, "num_classes": 10, "train_samples": 10,
                        "image_shape": [8, 8, 1]},
            "store_views": True, "targets": {"logits": True, "topk": None},
            "teachers": [{"name": "x", "arch": "cnn4", "checkpoint_sha256": "c" * 64, "val_acc": 0.9, "layers": {}}],
            "columns": {"logits.x": "tensor<halffloat>[10]"}, "shapes": {"logits.x": [10]}, "files": [part],
            "rows": 10, "bytes": 100}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    import pickle

    from raykd.pipeline.models.checkpoints import save_state_dict
    from raykd.pipeline.models.zoo import build_model

    d = tmp_path_factory.mktemp("bad")
    (d / "unknown_key.yaml").write_text("distill: {optim: {epoch: 3}}\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "dup.yaml").write_text("distill:\n  optim: {epochs: 3}\ndistill:\n  optim: {epochs: 4}\n")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (d / "bomb.yaml").write_text(laughs)
    (d / "bomb_unknown.yaml").write_text("run: {seed: 0}\nnot_a_section:\n" + "".join(f"  {ln}\n" for ln in laughs.splitlines()))
    (d / "recursive.yaml").write_text("run: &r {compare: [*r]}\n")
    (d / "regular").write_text("a file, not a folder\n")
    (d / "mods").mkdir()
    (d / "mods" / "raykd_test_exits.py").write_text("import sys\nsys.exit(0)\n")
    save_state_dict(build_model("cnn4", 3, 1).state_dict(), str(d / "three.safetensors"))  # 3 classes, digits has 10
    with open(d / "pickled.pt", "wb") as f:
        pickle.dump({"w": [1, 2, 3]}, f)
    (d / "records" / "teachers" / "t").mkdir(parents=True)
    (d / "records" / "teachers" / "t" / "teacher.json").write_text("[]")
    for name, manifest in (("manifest_list", []), ("manifest_str", "a cache"),
                           ("manifest_files", {**_manifest(), "files": "views/view=0/a.parquet"}),
                           ("manifest_escape", {**_manifest(), "files": [{**_manifest()["files"][0],
                                                                         "path": "../../etc/passwd"}]}),
                           ("foreign", _manifest(views=8))):
        (d / name).mkdir()
        (d / name / "manifest.json").write_text(json.dumps(manifest))
    # what a run left: a bad-input run must change none of it
    for rel in ("out/teachers/resnet8/metrics.jsonl", "out/cache/config.resolved.yaml", "out/students/kd-cnn4-s0/student.json"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(f"{rel}: written by an earlier run\n")
    return str(d)


def tree(root: str) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _set_env(monkeypatch, changes: dict) -> None:
    import s3fs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k, v in changes.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs reuses clients made with other credentials


def error_line(err: str) -> str:
    """The one `raykd: error:` line of a failed command's stderr (asserting there is exactly one)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("raykd: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp, cli, monkeypatch):
    argv, env_changes, needle = CASES[case]
    _set_env(monkeypatch, env_changes)
    monkeypatch.syspath_prepend(os.path.join(tmp, "mods"))
    before = tree(tmp)
    code, _, err = cli(*[a.format(tmp=tmp) for a in argv])
    assert code == 2, (code, err[-2000:])
    assert needle.format(tmp=tmp) in error_line(err), err[-2000:]
    after = tree(tmp)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing already there changed
    assert not set(after) - set(before)  # nor anything written, inside the run's folder or out of it


def _live_lock(folder: str, pid: int | None = None) -> None:
    """A lock as a running raykd holds it: a live owner on this host, a fresh heartbeat."""
    import socket

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".raykd.lock"), "w") as f:
        json.dump({"token": "t" * 32, "started": time.time(), "heartbeat": time.time(),
                   "owner": {"host": socket.gethostname(), "pid": pid or os.getpid()}}, f)


def test_teachers_of_one_out_dir_are_trained_by_one_process(tmp_path, cli, monkeypatch):
    """A second `raykd teachers` beside a running one is refused naming it, and writes nothing."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _live_lock(str(tmp_path / "teachers"))
    before = tree(str(tmp_path))
    code, _, err = cli("teachers", *DEMO, f"run.out_dir={tmp_path}", "teachers.optim.epochs=1")
    assert code == 2
    line = error_line(err)
    assert f"another `raykd teachers` of {tmp_path} is running (pid {os.getpid()} on" in line, line
    assert tree(str(tmp_path)) == before


def test_yaml_reader_keeps_merge_keys_and_refuses_what_expands(tmp_path):
    """`<<: *base` still overrides merged keys (not a duplicate); the bound counts expanded values."""
    from raykd.pipeline.core import yamlio

    assert yamlio.load("base: &b {x: 1, y: 2}\nd: {<<: *b, y: 3}\n")["d"] == {"x": 1, "y": 3}
    small = "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n"
    assert yamlio.load(small)["b"] == [[1, 2, 3]] * 3
    wide = "a: &a [" + ", ".join(["0"] * 1000) + "]\nb: [" + ", ".join(["*a"] * 100) + "]\n"  # 100,000 values
    with pytest.raises(yamlio.YamlError, match="more than 100,000 values"):
        yamlio.load(wide)


def test_paths_stay_inside_their_root(tmp_path):
    from raykd.pipeline.core.errors import ConfigError
    from raykd.pipeline.core.records import inside

    root = str(tmp_path)
    assert inside(root, "students", "kd-cnn4-s0") == os.path.join(root, "students", "kd-cnn4-s0")
    for parts in (("students", ".."), ("..", "x"), ("students", "/etc"), ("students", "a/../../../b"), (".",)):
        with pytest.raises(ConfigError, match="would write outside"):
            inside(root, *parts)


@pytest.mark.parametrize("kind,write", [
    ("teacher record", lambda d: (d / "teachers" / "t").mkdir(parents=True) or
     (d / "teachers" / "t" / "teacher.json").write_text('{"fingerprint": 1, "best": "x"}')),
    ("student record", lambda d: (d / "s").mkdir() or (d / "s" / "student.json").write_text('{"files": []}')),
    ("professor record", lambda d: (d / "professor").mkdir() or
     (d / "professor" / "professor.json").write_text('{"file": "../x.safetensors", "sha256": "", "fingerprint": ""}')),
])
def test_records_of_another_shape_are_named(tmp_path, kind, write):
    from raykd.pipeline.core.errors import RaykdError
    from raykd.pipeline.stages import distill, professor, teachers

    write(tmp_path)
    read = {"teacher record": lambda: teachers.teacher_record(teachers.teacher_dir(str(tmp_path), "t")).read(),
            "student record": lambda: distill.student_record(str(tmp_path / "s")).read(),
            "professor record": lambda: professor.professor_record(str(tmp_path / "professor")).read()}[kind]
    with pytest.raises(RaykdError, match=f": not a raykd {kind} \\("):
        read()


# --------------------------------------------------------------------------------------------------
# cases that need a cache and a Ray (the session's)


@pytest.fixture
def built_cfg(built, tmp_path):
    """The shared run's config as a YAML file (its cache named explicitly, so a run elsewhere reads it)."""
    from raykd.pipeline.cache import cache_uri
    from raykd.pipeline.core.config import dump_config, variant

    cfg, _ = built
    path = tmp_path / "built.yaml"
    path.write_text(dump_config(variant(cfg, {"cache.uri": cache_uri(cfg)}, "test")))
    return cfg, str(path)


def test_a_request_no_node_can_hold_is_refused_before_it_waits(built_cfg, cli, monkeypatch):
    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.time()
    code, _, err = cli("distill", "-c", path, "distill.name=too-big", "run.in_process=false",
                       "distill.workers.cpus_per_worker=64")
    assert code == 2 and time.time() - t0 < 30
    line = error_line(err)
    assert "distill.workers.cpus_per_worker/gpus_per_worker: each asks for 64 CPU, but this machine's Ray has 4 CPU" in line
    assert not os.path.exists(os.path.join(cfg.run.out_dir, "students", "too-big"))


def test_a_damaged_cache_is_named_not_reused(built_cfg, cli, tmp_path, monkeypatch):
    """`raykd cache` on a cache whose part file went missing says so (and not that it is up to date)."""
    import shutil

    from raykd.pipeline.cache import cache_uri

    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    copy = tmp_path / "damaged"
    shutil.copytree(cache_uri(cfg), copy)
    part = json.load(open(copy / "manifest.json"))["files"][0]["path"]
    os.remove(copy / part)
    before = tree(str(copy))
    code, out, err = cli("cache", "-c", path, f"cache.uri={copy}")
    assert code == 2
    assert f"{copy}: part file {part} is missing" in error_line(err)
    assert "up to date" not in out + err
    assert tree(str(copy)) == before


@pytest.mark.parametrize("stage", ["distill", "professor", "sweep"])
def test_an_output_held_by_a_running_process_is_refused(built_cfg, cli, tmp_path, monkeypatch, stage):
    """A live owner's lock on the output folder: refused naming it, nothing of that output written."""
    import shutil

    from raykd.pipeline.cache import cache_uri

    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    shutil.copytree(cache_uri(cfg), cache)  # the professor would add its column: not to the shared cache
    shutil.copytree(os.path.join(cfg.run.out_dir, "teachers"), out / "teachers")
    folder, extra, what = {
        "distill": (out / "students" / "held", ["distill.name=held"], "training of student 'held'"),
        "professor": (out / "professor", [], "run of the professor"),
        "sweep": (out / "sweeps" / "held", ["sweep.name=held", "sweep.space={method.name: {grid: [kd]}}"],
                  "sweep 'held'"),
    }[stage]
    _live_lock(str(folder))
    before = tree(str(tmp_path))
    code, _, err = cli(stage, "-c", path, f"run.out_dir={out}", f"cache.uri={cache}", *extra)
    assert code == 2
    assert f"{folder}: another {what} is running (pid {os.getpid()} on" in error_line(err)
    assert tree(str(tmp_path)) == before


def test_a_dead_owners_lock_is_taken_over(built_cfg, cli, monkeypatch):
    import subprocess

    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = os.path.join(cfg.run.out_dir, "students", "orphan")
    _live_lock(folder, pid=dead.pid)
    code, _, err = cli("distill", "-c", path, "distill.name=orphan", "distill.optim.epochs=1")
    assert code == 0, err[-2000:]
    assert os.path.isfile(os.path.join(folder, "student.json")) and not os.path.exists(os.path.join(folder, ".raykd.lock"))


def test_two_processes_one_student(built_cfg, cli, tmp_path, monkeypatch):
    """Two `raykd distill` of one student at once: one trains, the other exits 2 naming it; what the first
    writes is what a solo run writes (the same weights, byte for byte)."""
    import subprocess
    import sys

    from conftest import ROOT

    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # 40 epochs (~6 s): the first run is still training when the second, in this process, looks (under 1 s)
    args = ["distill", "-c", path, "distill.name=twice", "distill.optim.epochs=40", "distill.workers.torch_threads=1"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "raykd", *args, f"run.out_dir={tmp_path / 'a'}"],
                             stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    lock = tmp_path / "a" / "students" / "twice" / ".raykd.lock"
    deadline = time.time() + 60
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), open(tmp_path / "first.log").read()[-3000:]
    code, _, err = cli(*args, f"run.out_dir={tmp_path / 'a'}")
    assert code == 2
    assert f"another training of student 'twice' is running (pid {first.pid} on" in error_line(err)
    assert first.wait(timeout=120) == 0, open(tmp_path / "first.log").read()[-3000:]
    assert cli(*args, f"run.out_dir={tmp_path / 'solo'}")[0] == 0
    a, solo = (tmp_path / d / "students" / "twice" for d in ("a", "solo"))
    assert tree(str(a))[str(a / "student.safetensors")] == tree(str(solo))[str(solo / "student.safetensors")]
    ra, rs = (json.load(open(d / "student.json")) for d in (a, solo))
    assert (ra["val_acc"], ra["test_acc"], ra["fingerprint"]) == (rs["val_acc"], rs["test_acc"], rs["fingerprint"])


def test_a_killed_worker_is_raykds_line_not_rays_paragraph(built_cfg, cli, capsys, tmp_path, monkeypatch):
    """A Ray task's worker process that dies: raykd says it and retries; Ray's raylet paragraph (RayTask ID,
    exit detail) stays out of the console (at debug level, `-v`)."""
    cfg, path = built_cfg
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAYKD_FAULT", json.dumps({"epoch": 1, "step": 1, "marker": str(tmp_path / "f"), "kind": "exit"}))
    code, out, err = cli("distill", "-c", path, "distill.name=killed-worker", "run.in_process=false",
                         "distill.optim.epochs=2", "distill.workers.max_failures=1")
    assert code == 0, err[-3000:]
    assert (tmp_path / "f").exists()  # the worker did exit
    time.sleep(2)  # the raylet's message reaches the driver's listener thread after the task's error
    later = capsys.readouterr()
    text = out + err + later.out + later.err
    assert "[distill killed-worker] failed (" in text and "restarting from its" in text, text[-3000:]
    assert "Worker exit type" not in text and "RayTask ID" not in text, text[-3000:]


def test_sigterm_is_an_interrupt(built, tmp_path):
    """SIGTERM to a running build: the interrupted line and exit 143 (not Ray's abort and C++ stack), the
    committed view kept and the lock let go, as after Ctrl-C (that a rerun then resumes is
    tests/test_cache.py::test_killed_driver_then_rerun_completes_each_row_once)."""
    import signal

    from conftest import build_until_view_0

    cfg, _ = built
    uri = str(tmp_path / "terminated")
    proc, log = build_until_view_0(cfg, tmp_path, [f"cache.uri={uri}", "cache.views=2", "cache.views_per_pass=1"])
    marker = os.path.join(uri, "_views", "view=0.json")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "raykd: interrupted (SIGTERM); rerun the same command to resume" in text, text[-3000:]
    assert "SIGABRT" not in text and "*** " not in text and "Traceback" not in text, text[-3000:]
    assert os.path.exists(marker) and not os.path.exists(os.path.join(uri, "manifest.json"))
    assert not os.path.exists(os.path.join(uri, "_build.lock"))  # released on the way out, not left to go stale


JOIN = """
import os, sys
sys.path.insert(0, {root!r})
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 3, "object_store_memory": 100 * 2**20,
                                                       "include_dashboard": False}})
try:
    from raykd.pipeline.cli import main
    code = main(["teachers", "run.out_dir={out}", "run.device=cpu", "cache.layers={{}}", "teachers.optim.epochs=1",
                 "teachers.models=[{{name: a, arch: cnn4}}, {{name: b, arch: cnn4, seed: 1}}]"])
    print("NODES", len(ray.nodes()), "ADDRESS", cluster.address == ray.get_runtime_context().gcs_address, flush=True)
    print("EXIT", code, flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
    current = "/tmp/ray/ray_current_cluster"
    if os.path.exists(current) and open(current).read().strip() == cluster.address:
        os.remove(current)
"""


@pytest.mark.timeout(180)
def test_a_ray_started_on_this_machine_is_joined(tmp_path):
    """With a `ray start` cluster on this machine (here Ray's own Cluster utility, which is one), a local
    run joins it, as ray.init() does, and says so (it used to fail: num_cpus given to an existing cluster)."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", JOIN.format(root=ROOT, out=tmp_path / "out")], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=170)
    text = p.stdout + p.stderr
    assert "EXIT 0" in text and "ADDRESS True" in text, text[-3000:]
    assert "[ray] joining the Ray cluster running on this machine (`ray start`" in text, text[-3000:]
    assert os.path.isfile(tmp_path / "out" / "teachers" / "b" / "teacher.json")
