"""Bring your own model: torchvision:<name> and module.path:factory archs, feature taps by module path,
foreign checkpoints (key map, torchvision weights from the torch cache), run.imports in Ray workers."""

import json
import os

import pytest
import torch

from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import CheckpointError, ConfigError
from raykd.pipeline.models.checkpoints import load_foreign, map_keys, resolve_checkpoint
from raykd.pipeline.models.sources import TappedModel
from raykd.pipeline.models.zoo import build_model

USER_MODULE = '''
import torch.nn as nn
from raykd.pipeline.models.zoo import MODELS


class Tiny(nn.Module):
    """A user's model: no forward_stages; its stages named by module path."""

    raykd_stages = ["body.0", "body.5"]

    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def tiny(num_classes, in_chans):
    return Tiny(num_classes, in_chans)


@MODELS.register("{registered}")
def _registered(num_classes, in_chans):
    return TappedModel(Tiny(num_classes, in_chans), num_classes, in_chans)


from raykd.pipeline.models.sources import TappedModel  # noqa: E402
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module written in the test, importable here from a folder Ray's workers do not have on sys.path;
    its registered model name is unique per test (the registry is per process)."""
    name = f"raykd_user_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE.replace("{registered}", f"reg_{name}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_tapped_shapes_match_a_forward_and_grey_is_repeated():
    torch.manual_seed(0)
    m = build_model("torchvision:resnet18", 10, 1)
    assert isinstance(m, TappedModel) and m.stage_names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, 1, 28, 28)
    logits, maps = m.eval().forward_stages(x)
    assert logits.shape == (2, 10)
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == m.stage_shapes(28)
    assert m.stage_shapes(28)["layer3"] == (256, 2, 2)
    # the grey channel is repeated: the same logits as the bare net on a 3-channel copy
    assert torch.equal(logits, m.net(x.repeat(1, 3, 1, 1)))
    # no hook is left behind
    assert all(not mod._forward_hooks for mod in m.modules())
    # a trunk held in one Sequential is split into its children
    assert build_model("torchvision:mobilenet_v3_small", 10, 3).stage_names[:2] == ["features.0", "features.1"]
    # and a dotted stage survives the cache's column names
    from raykd.pipeline.cache import columns as C

    col = C.feat("tv", "features.8")
    assert C.parse(col) == C.Column("feat", "tv", "features.8") and C.parse(C.scale(col)).part == "scale"
    assert C.parse(C.scale(C.feat("b", "stage3"))) == C.Column("feat", "b", "stage3", "scale")


def test_arch_errors_name_the_culprit(tmp_path):
    with pytest.raises(ConfigError, match="torchvision has no classification model 'resnet17'"):
        load_config(None, ["distill.student.arch=torchvision:resnet17"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_config(None, ["distill.student.arch=no_such_module_xyz:factory"])
    with pytest.raises(ConfigError, match=r"run.imports: cannot import 'no_such_module_xyz' \(No module named"):
        load_config(None, ["run.imports=[no_such_module_xyz]"])


def test_user_factory_and_registered_model(user_module):
    m = build_model(f"{user_module}:tiny", 10, 1)
    assert m.stage_shapes(8) == {"body.0": (16, 8, 8), "body.5": (32, 4, 4)}
    cfg = load_config(None, [f"run.imports=[{user_module}]", f"distill.student.arch=reg_{user_module}"])
    assert build_model(cfg.distill.student.arch, 10, 1).stage_names == ["body.0", "body.5"]


def test_foreign_keys_load_with_a_map(tmp_path):
    torch.manual_seed(0)
    src = build_model("torchvision:resnet18", 10, 3).net
    ddp_style = {f"module.{k}": v for k, v in src.state_dict().items()}  # as saved from a DDP wrapper
    path = str(tmp_path / "foreign.pth")
    torch.save(ddp_style, path)
    dst = build_model("torchvision:resnet18", 10, 3)
    with pytest.raises(CheckpointError, match="does not fit arch 'torchvision:resnet18'.*Missing key"):
        load_foreign(dst, torch.load(path, weights_only=True), path, "torchvision:resnet18")
    load_foreign(dst, torch.load(path, weights_only=True), path, "torchvision:resnet18", {"module.": ""})
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.net.state_dict().values()))
    # raykd's own (net.-prefixed) state dict loads too; a rule to None drops keys
    load_foreign(dst, dst.state_dict(), "own", "torchvision:resnet18")
    assert list(map_keys({"a.w": 1, "b.w": 2, "c": 3}, {"a.": None, "b.": "x."})) == ["x.w", "c"]


def test_torchvision_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(CheckpointError, match="not in the torch cache and raykd does not download"):
        resolve_checkpoint(ref)
    with pytest.raises(CheckpointError, match="torchvision has no weights"):
        resolve_checkpoint("torchvision:ResNet18_Weights.NOPE")
    # a stand-in file under the name torchvision gives the published weights (no download in tests)
    torch.manual_seed(0)
    net = build_model("torchvision:resnet18", 1000, 3)
    os.makedirs(tmp_path / "hub" / "checkpoints")
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    torch.save(net.net.state_dict(), path)
    assert resolve_checkpoint(ref) == str(path)
    assert resolve_checkpoint("some/file.safetensors") == "some/file.safetensors"


@pytest.mark.timeout(420)
def test_torchvision_teacher_and_user_student_through_the_pipeline(ray_session, user_module, tmp_path):
    """A torchvision teacher at its own input size (trained, and a foreign copy of it loaded with a key map) and a user's
    module:factory student registered via run.imports, in Ray workers (run.in_process=false): teachers ->
    cache with a module-path feature tap -> FEED distillation."""
    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    out = tmp_path / "run"
    base = [f"run.out_dir={out}", "run.device=cpu", "run.in_process=false", f"run.imports=[{user_module}]",
            "teachers.optim.epochs=4", "teachers.optim.batch_size=64",
            "teachers.models=[{name: tv, arch: 'torchvision:resnet18', seed: 1, image_size: 16}]"]
    (rec,) = run_teachers(load_config(None, base))
    assert rec["arch"] == "torchvision:resnet18" and rec["test_acc"] > 0.7  # 10 classes: chance is 0.1

    # the same weights as a foreign checkpoint (torchvision's own keys under a DDP prefix), mapped back
    from raykd.pipeline.models.checkpoints import load_state_dict

    own = load_state_dict(os.path.join(out, "teachers", "tv", "best.safetensors"))
    foreign = str(tmp_path / "tv_ddp.pth")
    torch.save({f"module.{k[4:]}": v for k, v in own.items()}, foreign)
    cfg = load_config(None, base[:-1] + [
        f"teachers.models=[{{name: tv, arch: 'torchvision:resnet18', checkpoint: {foreign}, image_size: 16, "
        "checkpoint_key_map: {'module.': ''}}]",
        "cache.views=1", "cache.layers={tv: [layer2]}", f"distill.student.arch={user_module}:tiny",
        "distill.optim.epochs=3", "distill.optim.batch_size=32", "method.name=feed", "method.feed.beta=50", "method.feed.teacher_layers={tv: layer2}",
        "method.feed.student_layer=body.5"])
    (given,) = run_teachers(cfg)
    assert given["test_acc"] == pytest.approx(rec["test_acc"])
    manifest = build_cache(cfg)
    (t,) = manifest["teachers"]
    # the cache actor fed the teacher its own 16-pixel input: layer2 is 2x2, not the 1x1 of 8-pixel digits
    assert t["arch"] == "torchvision:resnet18" and t["layers"] == {"layer2": [128, 2, 2]}
    assert t["preprocess"]["image_size"] == 16
    srec = run_distill(cfg)
    assert srec["arch"] == f"{user_module}:tiny" and srec["test_acc"] > 0.4  # chance 0.1; 3 epochs
    assert os.path.isdir(os.path.join(out, "students", srec["name"]))
    lines = [json.loads(x) for x in open(os.path.join(out, "students", srec["name"], "metrics.jsonl"))]
    assert len(lines) == 3 and lines[-1]["train_feed"] < lines[0]["train_feed"]  # the tapped maps are matched


def test_teacher_preprocess_resizes_and_renormalises(tmp_path, digits):
    """A teacher with its own input size and normalisation: the model sees the data set's images resized
    (torchvision's antialiased resize) and normalised with its statistics, in training, evaluation and
    every later load (the record keeps them)."""
    from torchvision.transforms.v2.functional import resize

    from raykd.pipeline.harness.training import evaluate
    from raykd.pipeline.models.zoo import Preprocess
    from raykd.pipeline.stages.teachers import load_teacher, run_teachers

    pre = Preprocess(digits.mean, digits.std, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raw = torch.rand(2, 1, 8, 8)
    x = (raw - torch.tensor(digits.mean).view(1, -1, 1, 1)) / torch.tensor(digits.std).view(1, -1, 1, 1)
    want = (resize(raw.expand(-1, 3, -1, -1), [16, 16], antialias=True) - torch.tensor(pre.mean).view(1, 3, 1, 1)) \
        / torch.tensor(pre.std).view(1, 3, 1, 1)
    assert torch.allclose(pre(x), want, atol=1e-5)

    with pytest.raises(ConfigError, match="mean and std come together"):
        load_config(None, ["teachers.models=[{name: a, arch: cnn4, mean: [0.5]}]"])
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.device=cpu", "teachers.optim.epochs=6",
                             "teachers.models=[{name: big, arch: cnn8, image_size: 16, mean: [0.5], std: [0.25]}]"])
    (rec,) = run_teachers(cfg)
    assert rec["preprocess"] == {"image_size": 16, "mean": [0.5], "std": [0.25], "data_mean": list(digits.mean),
                                 "data_std": list(digits.std)}
    model, _ = load_teacher(str(tmp_path), "big")
    assert model.stage_shapes(8)["stage3"] == (32, 4, 4)  # cnn8 at 16 px, not 2x2 at 8
    acc, _ = evaluate(model, torch.from_numpy(digits.test.images), torch.from_numpy(digits.test.labels),
                      digits.mean, digits.std, "cpu")
    assert acc == pytest.approx(rec["test_acc"], abs=1e-9) and acc > 0.5


# --------------------------------------------------------------------------------------------------
# timm: one registered model source (pipeline/models/sources.py); tests build timm's tiny test models untrained


def test_timm_models_are_raykd_models_with_timms_own_feature_taps():
    from raykd.pipeline.models.zoo import check_arch

    pytest.importorskip("timm")
    m = build_model("timm:test_efficientnet", 10, 1).eval()
    x = torch.randn(4, 1, 16, 16)
    logits, stages = m.forward_stages(x)
    assert torch.allclose(logits, m.net(x), atol=1e-5)  # the model's own forward, split at its features
    final, maps = m.net.forward_intermediates(x)
    assert list(stages) == [f["module"] for f in m.net.feature_info] == m.stage_names
    assert all(torch.equal(stages[n], t) for n, t in zip(stages, maps))
    assert m.stage_shapes(16)["blocks.2"] == tuple(stages["blocks.2"].shape[1:])
    with pytest.raises(ValueError, match="'timm:no_such_net': timm has no model 'no_such_net'"):
        check_arch("timm:no_such_net")


def test_timm_checkpoints_come_from_the_hugging_face_cache_never_downloaded(tmp_path, monkeypatch):
    """`timm:<name>` as a teacher's checkpoint: the weights file of its hub id in the local Hugging Face
    cache, or an error saying how to put it there."""
    pytest.importorskip("timm")
    import huggingface_hub.constants as hf

    from raykd.pipeline.models.checkpoints import resolve_checkpoint

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"timm:resnet18.a1_in1k: timm/resnet18.a1_in1k is not in the Hugging "
                                              r"Face cache and raykd does not download"):
        resolve_checkpoint("timm:resnet18.a1_in1k")
    snap = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abc")
    assert resolve_checkpoint("timm:resnet18.a1_in1k") == str(snap / "model.safetensors")
    assert resolve_checkpoint(str(tmp_path / "w.pt")) == str(tmp_path / "w.pt")  # a file is itself


def test_timm_teacher_cache_and_student(ray_session, tmp_path):
    """A timm teacher -> a cache of its logits and a map tapped by timm's feature API -> a timm student."""
    pytest.importorskip("timm")
    from raykd.pipeline.cache import Cache, build_cache, column_array
    from raykd.pipeline.data.datasets import normalize
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import load_teacher, run_teachers

    out = tmp_path / "run"
    cfg = load_config(None, [f"run.out_dir={out}", "run.device=cpu", "teachers.optim.epochs=4",
                             "teachers.optim.batch_size=64",
                             "teachers.models=[{name: tm, arch: 'timm:test_efficientnet', seed: 1, image_size: 16}]",
                             "cache.views=1", "cache.layers={tm: [blocks.2]}", "distill.student.arch=timm:test_resnet",
                             "method.name=kd", "distill.optim.epochs=3", "distill.optim.batch_size=32"])
    (rec,) = run_teachers(cfg)
    assert rec["arch"] == "timm:test_efficientnet" and rec["test_acc"] > 0.3  # 10 classes: chance is 0.1
    manifest = build_cache(cfg)
    (t,) = manifest["teachers"]
    assert manifest["columns"]["feat.tm.blocks.2"].startswith("tensor<halffloat>")
    table = Cache(str(out / "cache")).read_table(["pixels", "logits.tm", "feat.tm.blocks.2"])
    teacher, _ = load_teacher(str(out), "tm")
    splits_mean, splits_std = manifest["dataset"]["mean"], manifest["dataset"]["std"]
    with torch.inference_mode():
        x = normalize(torch.from_numpy(column_array(table, "pixels")[:64]), splits_mean, splits_std)
        logits, maps = teacher.forward_stages(x)
    cached = torch.from_numpy(column_array(table, "feat.tm.blocks.2")[:64].astype("float32"))
    assert tuple(cached.shape[1:]) == tuple(t["layers"]["blocks.2"])
    assert torch.allclose(cached, maps["blocks.2"], atol=2e-2, rtol=1e-2)  # fp16 of timm's own intermediate map
    assert torch.allclose(torch.from_numpy(column_array(table, "logits.tm")[:64].astype("float32")), logits, atol=2e-2)
    srec = run_distill(cfg)
    assert srec["arch"] == "timm:test_resnet" and srec["test_acc"] > 0.3
