"""FEED: the loss on fixed tensors, its properties, int8 feature storage, and students from the digits cache."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import digits_cfg

from raykd.methods import MethodContext, Targets, build_method
from raykd.methods.feed import feed_loss
from raykd.pipeline.cache import CacheError, dequantize_int8, quantize_int8
from raykd.pipeline.core.config import MethodSection
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.models.zoo import build_model
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.student_job import Distiller
from raykd.pipeline.stages.students import run_distill

# fixed inputs, written out (no RNG): a student map (2, 2, 4, 4) and a teacher map (2, 2, 2, 2)
S = torch.arange(64, dtype=torch.float32).reshape(2, 2, 4, 4).sin()
T = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2).cos()
GOLDEN_FEED = 0.5767734  # computed once with ref_feed below (float64) and kept as a number


def ref_feed(s, t):
    """numpy reference: 2x2 average pooling of the larger map, per-sample L2 normalisation, mean |diff|."""
    s = s.reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))
    s = s.reshape(2, -1) / np.linalg.norm(s.reshape(2, -1), axis=1, keepdims=True)
    t = t.reshape(2, -1) / np.linalg.norm(t.reshape(2, -1), axis=1, keepdims=True)
    return float(np.abs(t - s).mean())


def test_feed_loss_golden_value_and_reference():
    assert ref_feed(S.double().numpy(), T.double().numpy()) == pytest.approx(GOLDEN_FEED, abs=1e-7)
    assert feed_loss(S, T).item() == pytest.approx(GOLDEN_FEED, abs=1e-6)


def test_feed_loss_is_scale_free_and_zero_on_proportional_maps():
    assert feed_loss(3.0 * T, T).item() == pytest.approx(0.0, abs=1e-7)
    assert feed_loss(S, 10.0 * T).item() == pytest.approx(feed_loss(S, T).item(), rel=1e-6)


def _feed(teachers=("a", "b"), **changes):
    stages = {"stage1": (4, 4, 4), "stage2": (8, 2, 2), "stage3": (16, 2, 2)}  # cnn4 on 8x8
    teacher = {"stem": (16, 8, 8), "stage1": (16, 8, 8), "stage2": (32, 4, 4), "stage3": (64, 2, 2)}  # resnet8
    ctx = MethodContext(num_classes=10, teachers=list(teachers), epochs=3, student_stages=stages,
                        teacher_stages={t: teacher for t in teachers})
    return build_method(MethodSection(name="feed", **changes), ctx)


def test_feed_reads_only_the_teachers_feature_maps_and_trains_one_ntl_each():
    m = _feed()
    assert m.columns() == ["feat.a.stage3", "feat.b.stage3"]  # no logits column
    assert _feed(feed={"teacher_layers": {"a": "stage2"}}).columns() == ["feat.a.stage2", "feat.b.stage3"]
    torch.manual_seed(0)
    student = build_model("cnn4", 10, 1)
    model = Distiller(student, m)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    fa = torch.randn(6, 64, 2, 2, requires_grad=True)
    targets = Targets(features={"a": {"stage3": fa}, "b": {"stage3": torch.randn(6, 64, 2, 2)}})
    _, terms = model(x, targets, y, 1)
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + 500 * terms["feed"].item(), rel=1e-5)
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in m.parameters()) and fa.grad is None  # the teacher is frozen
    assert set(m.ntls) == {"a", "b"} and m.ntls["a"][0].in_channels == 16 and m.ntls["a"][-3].out_channels == 64
    # the paper's NTLs by default: three 3x3 convolutions C_s -> C_s -> C_t -> C_t; the bottleneck is smaller
    size = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert all(m.ntls["a"][i].kernel_size == (3, 3) for i in (0, 3, 6))
    assert size(m.ntls["a"]) == 9 * (16 * 16 + 16 * 64 + 64 * 64) + 2 * (16 + 64 + 64)
    small = _feed(feed={"ntl": "bottleneck"})
    assert small.ntls["a"][3].kernel_size == (3, 3) and small.ntls["a"][3].in_channels == 8
    assert size(small.ntls["a"]) == 16 * 8 + 9 * 8 * 8 + 8 * 64 + 2 * (8 + 8 + 64)


def test_bottleneck_feed_adapters_are_smaller_than_the_benchmark_student():
    """The benchmark's student (cnn8, 6,274 parameters) and teachers (resnet20, resnet8, cnn32 last stages):
    `ntl: bottleneck` adapters are smaller than the student (the paper's default ones are dropped after
    training, whatever their size)."""
    student = build_model("cnn8", 10, 1)
    stages = {k: tuple(v) for k, v in student.stage_shapes(28).items()}
    teachers = {t: build_model(t, 10, 1).stage_shapes(28) for t in ("resnet20", "resnet8", "cnn32")}
    ctx = MethodContext(num_classes=10, teachers=list(teachers), epochs=3, student_stages=stages, teacher_stages=teachers)
    m = build_method(MethodSection(name="feed", feed={"ntl": "bottleneck"}), ctx)
    assert sum(p.numel() for p in m.parameters()) == 5152 < student.num_params() == 6274


def test_feed_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="method.feed.student_layer='stage9'"):
        _feed(feed={"student_layer": "stage9"})
    with pytest.raises(ConfigError, match="method.feed.teacher_layers.a='fc'"):
        _feed(feed={"teacher_layers": {"a": "fc"}})
    with pytest.raises(ConfigError, match="FEED distils feature maps"):
        _feed(targets="refined")


INT8_TOL = 0.02  # |FEED loss(int8 maps) - FEED loss(fp32 maps)| / loss, and the maps' max error / max|x|


def test_int8_feature_maps_reconstruct_fp32_and_give_the_same_feed_loss():
    """Real maps (a trained-shape resnet8's stage3 on digits-sized input): per-row symmetric int8 bounds
    each element's error by scale/2 = max|x|/254; the FEED loss moves by well under INT8_TOL."""
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, 1).eval()
    with torch.no_grad():
        _, maps = teacher.forward_stages(torch.randn(32, 1, 8, 8))
    f = maps["stage3"]
    q, scale = quantize_int8(f)
    back = dequantize_int8(q, scale)
    err = (back - f).abs().flatten(1).amax(1)
    assert torch.all(err <= f.abs().flatten(1).amax(1) / 254 + 1e-7)
    assert torch.all(err <= INT8_TOL * f.abs().flatten(1).amax(1))
    m = _feed(teachers=("a",))
    student = build_model("cnn4", 10, 1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model = Distiller(student, m).eval()  # eval: BN statistics fixed, the two passes see one network
    with torch.no_grad():
        l32 = model(x, Targets(features={"a": {"stage3": f}}), y, 1)[1]["feed"].item()
        l8 = model(x, Targets(features={"a": {"stage3": back}}), y, 1)[1]["feed"].item()
    assert abs(l8 - l32) <= INT8_TOL * l32


@pytest.mark.timeout(400)
def test_feed_from_the_cache_end_to_end_and_a_missing_feature_column_named(built, tmp_path):
    cfg0, _ = built  # teacher b's stage2 and stage3 are cached (fp16); teacher a has no feature column
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=feed", "method.teachers=[b]", "distill.student.arch=cnn4",
                     "distill.optim.epochs=2", "distill.optim.lr=0.1")
    rec = run_distill(cfg)
    ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
    assert [m["teachers_loaded"] for m in ms] == [0, 0] and all(m["train_feed"] > 0 for m in ms)
    assert ms[1]["train_feed"] < ms[0]["train_feed"] and rec["test_acc"] > 0.2
    # the NTLs are the method's trained parts: saved beside the student, never part of it
    assert os.path.isfile(os.path.join(student_dir(cfg), "method.safetensors"))
    bad = digits_cfg(cfg0.run.out_dir, "method.name=feed", "method.teachers=[a]", "distill.student.arch=cnn4")
    with pytest.raises(CacheError, match=r"no column 'feat\.a\.stage3'.*cache\.layers: \{a: \[stage3\]\}.*online"):
        run_distill(bad)


@pytest.mark.timeout(400)
def test_feed_cached_and_online_agree(built):
    """One full-split batch per step: cached fp16 maps and the teacher run online in the worker give the
    same FEED losses within fp16 rounding."""
    cfg0, _ = built
    common = ["method.name=feed", "method.teachers=[b]", "distill.student.arch=cnn4", "distill.optim.epochs=2",
              "distill.optim.batch_size=2048", "distill.shuffle_buffer=0"]
    cached = digits_cfg(cfg0.run.out_dir, *common, "distill.name=feed-agree-cached")
    online = digits_cfg(cfg0.run.out_dir, *common, "distill.name=feed-agree-online", "distill.teachers=online")
    run_distill(cached), run_distill(online)
    mc, mo = ([json.loads(x) for x in open(os.path.join(student_dir(c), "metrics.jsonl"))] for c in (cached, online))
    assert [m["teachers_loaded"] for m in mo] == [1, 1] and [m["teachers_loaded"] for m in mc] == [0, 0]
    for a, b in zip(mc, mo):
        for k in ("train_loss", "train_ce", "train_feed"):
            assert a[k] == pytest.approx(b[k], rel=2e-3), (a["epoch"], k)


@pytest.mark.timeout(500)
def test_sequential_feed_two_generations_from_the_cache(built):
    """Generation 1 distils from cached teacher b; generation 2 from generation 1's frozen student, run in
    the worker on the same cached views; both accuracies are reported."""
    cfg0, _ = built
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=feed", "method.teachers=[b]", "method.feed.generations=2",
                     "method.feed.beta=50",  # at the default 500 the feature term outweighs CE 10x on 2 epochs of digits
                     "distill.student.arch=cnn4", "distill.optim.epochs=2", "distill.optim.lr=0.1")
    rec = run_distill(cfg)
    gens = rec["generations"]
    assert [g["name"] for g in gens] == ["feed-cnn4-s0-g1", "feed-cnn4-s0-g2"] and rec["name"] == "feed-cnn4-s0-g2"
    assert gens[0]["teachers"] == ["b"] and gens[1]["teachers"] == ["feed-cnn4-s0-g1"]
    assert all(0.1 < g["test_acc"] <= 1 for g in gens)
    out = os.path.join(cfg0.run.out_dir, "students")
    m1, m2 = ([json.loads(x) for x in open(os.path.join(out, g["name"], "metrics.jsonl"))] for g in gens)
    assert [m["teachers_loaded"] for m in m1] == [0, 0]  # g1: the cache's maps of b
    assert [m["teachers_loaded"] for m in m2] == [1, 1] and all(m["train_feed"] > 0 for m in m2)  # g2: g1's student
    assert json.load(open(os.path.join(out, "feed-cnn4-s0-g2", "generations.json")))["generations"] == gens
    # the same command again reuses both generations
    assert run_distill(cfg)["generations"] == gens
