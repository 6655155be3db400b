"""One Ray session per test session: more logical CPUs than cores (Ray Data's reads need CPUs beside the
Train workers), a small object store."""

import os

import pytest

# Before ray is imported anywhere: every Ray process inherits these.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
    """Tests that start Ray are marked `ray`: `make test-fast` leaves them out."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def cli(capsys, monkeypatch):
    """`raykd ARGV...` run in this process from the repository root: (exit status, stdout, stderr)."""
    from raykd.pipeline.cli import main

    monkeypatch.chdir(ROOT)

    def run(*argv):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (as s3fs's own tests run it), started before Ray so that every Ray
    process inherits the endpoint and the fake credentials through the environment."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits

    return load_splits(DataSection())


def logit_methods(with_teachers: bool = False) -> list[str]:
    """Every registered method that reads logits only (no feature maps), from the registry: a new one gets
    the tests parametrized by it for free. `with_teachers`: only those that read teachers' targets."""
    from raykd.methods import METHODS
    from raykd.methods.base import Method

    return [n for n, cls in METHODS.items() if cls.uses_logits and cls.feature_layers is Method.feature_layers
            and (cls.uses_teachers or not with_teachers)]


# The small run most Ray tests share: two tiny teachers on digits and a K=2 cache (with features of b).
TEACHERS = "teachers.models=[{name: a, arch: cnn4, seed: 1}, {name: b, arch: resnet8, seed: 2}]"


def digits_cfg(out, *extra):
    from raykd.pipeline.core.config import load_config

    return load_config(None, [f"run.out_dir={out}", "run.device=cpu", TEACHERS, "teachers.optim.epochs=2",
                              "cache.views=2", "cache.layers={b: [stage2, stage3]}", *extra])


@pytest.fixture(scope="session")
def built(ray_session, tmp_path_factory):
    """(config, cache manifest) of the shared run: teachers trained, cache built under <out>/cache."""
    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.stages.teachers import run_teachers

    cfg = digits_cfg(str(tmp_path_factory.mktemp("cache_run")))
    run_teachers(cfg)
    return cfg, build_cache(cfg)


@pytest.fixture
def digit_folder(tmp_path, digits):
    """An image folder made of real images: 80 digits as JPEGs (upscaled 8 -> 24 px), 10 class folders."""
    import numpy as np
    from PIL import Image

    test = np.concatenate([np.flatnonzero(digits.test.labels == c)[:2] for c in range(10)])
    for split, images, labels in (("train", digits.train.images[:60], digits.train.labels[:60]),
                                  ("val", digits.test.images[test], digits.test.labels[test])):
        for i, (img, y) in enumerate(zip(images, labels)):
            os.makedirs(tmp_path / split / f"c{y}", exist_ok=True)
            Image.fromarray(np.repeat(np.repeat(img[..., 0], 3, 0), 3, 1)).save(tmp_path / split / f"c{y}" / f"{i:03d}.jpg")
    return tmp_path


def build_until_view_0(cfg, tmp_path, extra):
    """`raykd cache` (the shared run's teachers; a local build, in that process) as its own process, with
    `extra` overrides (a cache.uri among them), once it has committed view 0: (process, its log file).
    Batches of one row make each view take seconds, so the process is still building the next one."""
    import subprocess
    import sys
    import time

    uri = next(e.split("=", 1)[1] for e in extra if e.startswith("cache.uri="))
    argv = [sys.executable, "-m", "raykd", "cache", f"run.out_dir={cfg.run.out_dir}", "run.device=cpu", TEACHERS,
            "teachers.optim.epochs=2", "cache.layers={b: [stage2, stage3]}", "cache.batch_size=1", *extra]
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would block the driver
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    marker = os.path.join(uri, "_views", "view=0.json")
    deadline = time.time() + 240
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(marker), log.read_text()[-3000:]
    return proc, log


