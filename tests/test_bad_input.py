"""Bad input through the CLI (called in this process), table-driven: each case is one short `raykd: error:`
line naming the field, file or URI at fault, exit status 2, no traceback, and nothing written where the run
would write."""

import os

import pytest

DEMO = ["-c", "configs/demo.yaml"]
NO_S3 = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
         "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
         "AWS_EC2_METADATA_DISABLED": "true"}
FAKE_S3 = {**NO_S3, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
DOWN = "http://127.0.0.1:9"  # nothing listens there

CASES = {  # id: (argv after `raykd`, extra env, what the message must contain)
    "unknown key in a file": (["config", "-c", "{tmp}/unknown_key.yaml"], {}, "unknown key 'distill.optim.epoch'"),
    "not a mapping": (["config", "-c", "{tmp}/list.yaml"], {}, "top level must be a mapping"),
    "missing config file": (["config", "-c", "{tmp}/nope.yaml"], {}, "nope.yaml not found"),
    "unknown key override": (["config", *DEMO, "teachers.optim.epoch=3"], {}, "unknown key 'teachers.optim.epoch'"),
    "wrong type": (["config", *DEMO, "teachers.optim.lr=fast"], {}, "'teachers.optim.lr'"),
    "negative batch size": (["distill", *DEMO, "distill.optim.batch_size=-8"], {}, "'distill.optim.batch_size'"),
    "zero workers": (["distill", *DEMO, "distill.workers.num_workers=0"], {}, "'distill.workers.num_workers'"),
    "K = 0": (["cache", *DEMO, "cache.views=0"], {}, "'cache.views'"),
    "unknown model": (["distill", *DEMO, "distill.student.arch=vgg99"], {}, "unknown model 'vgg99'"),
    "unknown method": (["distill", *DEMO, "method.name=fitnet"], {}, "unknown method 'fitnet'"),
    "unknown dataset": (["teachers", *DEMO, "data.name=mnist"], {}, "unknown dataset 'mnist'"),
    "unknown device": (["config", *DEMO, "run.device=gpu"], {}, "'run.device'"),
    "unknown teacher": (["distill", *DEMO, "method.teachers=[zz]"], {}, "method.teachers names unknown teachers ['zz']"),
    "test metric for a sweep": (["sweep", *DEMO, "sweep.metric=test_acc"], {}, "'sweep.metric'"),
    "multistep option without multistep": (["config", *DEMO, "distill.optim.gamma=0.5"], {},
                                           "gamma applies only to schedule: multistep"),
    "missing data set": (["teachers", *DEMO, "data.name=fashion-mnist", "data.root={tmp}/fmnist"], {},
                         "make fashion-mnist"),
    "missing teacher checkpoint": (["teachers", *DEMO, "cache.layers={{}}", "run.out_dir={tmp}/out",
                                    "teachers.models=[{{name: t, arch: cnn4, checkpoint: {tmp}/none.safetensors}}]"],
                                   {}, "teacher 't' (teachers.models[].checkpoint): checkpoint {tmp}/none.safetensors not found"),
    "teacher of other classes": (["teachers", *DEMO, "cache.layers={{}}", "run.out_dir={tmp}/out",
                                  "teachers.models=[{{name: t, arch: cnn4, checkpoint: {tmp}/three.safetensors}}]"],
                                 {}, "the data set digits has 10 classes"),
    "not a cache": (["inspect", "{tmp}/nothing"], {}, "is not a cache: no manifest.json"),
    "no cache for distill": (["distill", *DEMO, "run.out_dir={tmp}/out"], {}, "{tmp}/out/cache is not a cache"),
    "unreachable bucket": (["inspect", "s3://raykd-nowhere/c", "--s3-endpoint", DOWN], FAKE_S3,
                           "s3://raykd-nowhere/c: storage not reachable (EndpointConnectionError"),
    "S3 without credentials": (["inspect", "s3://raykd-nowhere/c", "--s3-endpoint", DOWN], NO_S3,
                               "no S3 credentials found"),
}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from pipeline.checkpoints import save_state_dict
    from pipeline.models import build_model

    d = tmp_path_factory.mktemp("bad")
    (d / "unknown_key.yaml").write_text("distill: {optim: {epoch: 3}}\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    save_state_dict(build_model("cnn4", 3, 1).state_dict(), str(d / "three.safetensors"))  # 3 classes, digits has 10
    return str(d)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp, cli, monkeypatch):
    import s3fs

    argv, env_changes, needle = CASES[case]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k, v in env_changes.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs reuses clients made with other credentials
    before = set(os.listdir(tmp))
    code, _, err = cli(*[a.format(tmp=tmp) for a in argv])
    assert code == 2, (code, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("raykd: error:")]
    assert lines and needle.format(tmp=tmp) in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert set(os.listdir(tmp)) <= before | {"out"}  # at most the run folder a stage made before failing
