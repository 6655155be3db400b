import os
import textwrap

import pytest
import yaml

from raykd.pipeline.core.config import Config, load_config, parse_override, write_resolved
from raykd.pipeline.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = _yaml(tmp_path, """
        data: {name: digits, seed: 3}
        teachers:
          optim: {epochs: 7}
          models: [{name: a, arch: cnn8}, {name: b, arch: resnet8, seed: 5}]
    """)
    cfg = load_config(path, ["teachers.optim.epochs=2", "teachers.optim.lr=0.2", "teachers.models.1.arch=cnn4",
                             "data.flip=true", "run.out_dir=/tmp/x"])
    assert cfg.data.seed == 3  # from the file
    assert cfg.teachers.optim.epochs == 2 and isinstance(cfg.teachers.optim.epochs, int)
    assert cfg.teachers.optim.lr == 0.2
    assert cfg.teachers.models[1].arch == "cnn4" and cfg.teachers.models[1].seed == 5
    assert cfg.data.flip is True
    assert cfg.teachers.optim.batch_size == Config().teachers.optim.batch_size  # default kept


def test_override_whole_list_and_index_into_default_list():
    cfg = load_config(None, ["teachers.models=[{name: x, arch: cnn4}]"])
    assert [t.name for t in cfg.teachers.models] == ["x"]
    cfg = load_config(None, ["teachers.models.0.seed=9"])
    assert cfg.teachers.models[0].seed == 9


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1", "a.b c=1", "teachers.models.x y=2"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(text)


@pytest.mark.parametrize("body, needle", [
    ("teachers: {optim: {epoch: 3}}", "unknown key 'teachers.optim.epoch'"),
    ("teachers: {optim: {epochs: many}}", "'teachers.optim.epochs'"),
    ("teachers: {optim: {epochs: -1}}", "greater than 0"),
    ("data: {name: mnist}", "unknown dataset 'mnist'"),
    ("teachers: {models: [{name: a, arch: vgg}]}", "unknown model 'vgg'"),
    ("teachers: {models: [{name: a, arch: cnn4}, {name: a, arch: cnn8}]}", "repeated: a"),
    ("- a\n- b", "top level must be a mapping"),
    ("data: {name: [unclosed", "not valid YAML"),
])
def test_file_errors_name_key_and_file(tmp_path, body, needle):
    path = _yaml(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)
    assert path in str(e.value)


def test_override_error_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["teachers.optim.epochs=abc"])
    assert "teachers.optim.epochs=abc" in str(e.value)
    with pytest.raises(ConfigError, match="no list item 5"):
        load_config(None, ["teachers.models.5.arch=cnn4"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["teachers.optim.epochs=4", "data.pad=0"])
    path = write_resolved(cfg, str(tmp_path))
    assert load_config(path) == cfg
    assert yaml.safe_load(open(path))["teachers"]["optim"]["epochs"] == 4


@pytest.mark.parametrize("args, needle", [  # more in tests/test_bad_input.py
    (["config", "-c", "configs/demo.yaml", "teachers.optim.epochs=3.5"], "teachers.optim.epochs"),
    (["config", "-c", "configs/demo.yaml", "teachers.optim.epochs"], "bad override"),
    (["teachers", "-c", "configs/demo.yaml", "data.name=cifar10", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
])
def test_cli_errors_are_short_and_nonzero(args, needle, cli):
    code, _, err = cli(*args)
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err and err.startswith("raykd: error:")


def test_cli_config_prints_resolved(cli):
    code, out, err = cli("config", "-c", "configs/demo.yaml", "teachers.optim.epochs=3")
    assert code == 0, err
    assert yaml.safe_load(out)["teachers"]["optim"]["epochs"] == 3
    data = yaml.safe_load(out)["data"]  # the data set's own view policy, not null
    assert (data["pad"], data["flip"]) == (1, False)
    code, out, _ = cli("config", "data.name=imagefolder", "data.image_size=64", "data.flip=false")
    assert code == 0 and (yaml.safe_load(out)["data"]["pad"], yaml.safe_load(out)["data"]["flip"]) == (8, False)


def test_shipped_configs_load():
    names = sorted(os.listdir(os.path.join(ROOT, "configs")))
    assert {"demo.yaml", "fashion_mnist.yaml", "bench.yaml", "bench_speed.yaml", "cifar100_resnet32x4_resnet8x4.yaml",
            "cifar100_wrn40_2_wrn16_2.yaml"} <= set(names)
    for name in names:
        load_config(os.path.join(ROOT, "configs", name))


def test_cifar100_recipe_configs():
    """The RepDistiller/mdistiller recipe: 240 epochs, lr 0.05 x0.1 at 150/180/210, the published pairs."""
    from raykd.pipeline.harness.training import make_optimizer
    from raykd.pipeline.models.zoo import build_model

    pairs = {"cifar100_resnet32x4_resnet8x4.yaml": ("resnet32x4", "resnet8x4", 8.0),
             "cifar100_wrn40_2_wrn16_2.yaml": ("wrn_40_2", "wrn_16_2", 6.0)}
    for name, (teacher, student, beta) in pairs.items():
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert [t.arch for t in cfg.teachers.models] == [teacher] and cfg.distill.student.arch == student
        assert cfg.method.dkd.beta == beta and cfg.method.dkd.warmup == 20 and cfg.method.kd.w_kd == 0.9
        for optim in (cfg.teachers.optim, cfg.distill.optim):
            assert (optim.epochs, optim.batch_size, optim.lr, optim.schedule) == (240, 64, 0.05, "multistep")
            opt, sched = make_optimizer(build_model(student, 100, 3).parameters(), optim, steps_per_epoch=2, epochs=240)
            lrs = []
            for _ in range(240 * 2):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            # epochs 0-149 at 0.05, then 0.005 / 0.0005 / 0.00005 from epochs 150, 180 and 210
            assert [lrs[2 * e] for e in (0, 149, 150, 179, 180, 209, 210, 239)] == pytest.approx(
                [0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5])


def test_multistep_options_do_not_change_other_schedules_fingerprints():
    """milestones/gamma are serialised only under `schedule: multistep`, so configs without it keep their
    fingerprints (teachers, caches and students trained before these options existed are reused)."""
    assert "gamma" not in load_config(None).model_dump()["distill"]["optim"]
    with pytest.raises(ConfigError, match="distill.optim.*applies only to schedule: multistep"):
        load_config(None, ["distill.optim.gamma=0.5"])
    cfg = load_config(None, ["distill.optim.schedule=multistep", "distill.optim.milestones=[3]"])
    assert cfg.model_dump()["distill"]["optim"]["milestones"] == [3]


def test_grad_clip_is_serialised_only_when_set():
    """No clipping keeps the fingerprints of runs made before the option; a clip is part of the config."""
    assert "grad_clip" not in load_config(None).model_dump()["distill"]["optim"]
    assert load_config(None, ["distill.optim.grad_clip=10"]).model_dump()["distill"]["optim"]["grad_clip"] == 10
    with pytest.raises(ConfigError, match="distill.optim.grad_clip"):
        load_config(None, ["distill.optim.grad_clip=-1"])


def test_interrupted_overwrite_names_the_command_that_resumes():
    """Ctrl-C during `raykd cache --overwrite`: running it again with --overwrite would wipe the views the
    build committed; the advice is the same command without it."""
    from raykd.pipeline.cli import build_parser, resume_advice

    argv = ["cache", "-c", "configs/demo.yaml", "--overwrite", "cache.views=2"]
    advice = resume_advice(build_parser().parse_args(argv), argv)
    assert advice == "to resume, run it again without --overwrite: raykd cache -c configs/demo.yaml cache.views=2"
    plain = ["distill", "-c", "configs/demo.yaml"]
    assert resume_advice(build_parser().parse_args(plain), plain) == "rerun the same command to resume"


def test_version(cli, capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli("--version")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"raykd {version('raykd')}"


def test_imagenet_pair_config():
    """The ImageNet-class pair: torchvision ResNet-34 with its published weights (resolved by name, never
    downloaded) -> ResNet-18, RandomResizedCrop record views with top-k targets, mdistiller's recipe."""
    import torchvision.models as tvm

    from raykd.pipeline.models.zoo import build_model

    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_resnet34_resnet18.yaml"))
    (t,) = cfg.teachers.models
    assert t.arch == "torchvision:resnet34" and tvm.get_weight(t.checkpoint.split(":", 1)[1]).meta["num_params"] == \
        build_model(t.arch, 1000, 3).num_params()
    assert t.preprocess() == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert cfg.distill.student.arch == "torchvision:resnet18" and cfg.data.view_policy == "random_resized_crop"
    assert cfg.cache.topk.k == 10 and not cfg.cache.logits and cfg.cache.store_views is None
    assert cfg.cache.views == cfg.distill.optim.epochs == 100
    o = cfg.distill.optim
    assert (o.batch_size, o.lr, o.weight_decay, o.milestones) == (512, 0.2, 1e-4, [30, 60, 90])
    assert (cfg.method.kd.temperature, cfg.method.kd.w_ce, cfg.method.kd.w_kd) == (1.0, 0.5, 0.5)
    assert (cfg.method.dkd.beta, cfg.method.dkd.warmup) == (0.5, 1)
