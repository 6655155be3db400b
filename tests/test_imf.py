"""IMF: attentive logit and feature loss on fixed tensors, the exported inference model, and a student
from the digits cache."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import digits_cfg

from raykd.methods import MethodContext, Targets, build_method
from raykd.methods.imf import IMFInference, attentive_logit, channel_normalised_distance, flops
from raykd.pipeline.core.config import MethodSection
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.harness.training import evaluate
from raykd.pipeline.models.checkpoints import load_state_dict
from raykd.pipeline.models.zoo import build_model
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.student_job import Distiller
from raykd.pipeline.stages.students import run_distill

Z1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
Z2 = torch.tensor([[-0.5, 1.0, 2.0], [2.0, -1.0, 0.0]])
A = torch.tensor([[0.3, -1.2, 0.0], [-0.4, 0.8, 2.0]])
S = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4).sin()
T = torch.arange(8, dtype=torch.float32).reshape(1, 2, 2, 2).cos()
# computed once with the numpy references below (float64) and kept as numbers
GOLDEN = {"att": [[0.5022817, 0.6423913, 1.8211956], [0.6636244, -0.5231883, -0.1192029]], "dist": 2.8430520}


def ref_att(zs, a):
    w = np.exp(a) / np.exp(a).sum(0, keepdims=True)
    return sum(w[k][None, :] * zs[k] for k in range(len(zs)))


def ref_dist(s, t):
    s = s.reshape(1, 2, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(1, 2, -1)
    t = t.reshape(1, 2, -1)
    s = s / np.linalg.norm(s, axis=2, keepdims=True)
    t = t / np.linalg.norm(t, axis=2, keepdims=True)
    return float(((s - t) ** 2).sum(2).mean())  # summed over the positions, averaged over channels


def test_attentive_logit_and_feature_loss_golden_values():
    ref = ref_att([Z1.double().numpy(), Z2.double().numpy()], A.double().numpy())
    np.testing.assert_allclose(ref, GOLDEN["att"], atol=1e-6)
    torch.testing.assert_close(attentive_logit([Z1, Z2], A), torch.tensor(GOLDEN["att"]), atol=1e-6, rtol=0)
    assert ref_dist(S.double().numpy(), T.double().numpy()) == pytest.approx(GOLDEN["dist"], abs=1e-7)
    assert channel_normalised_distance(S, T).item() == pytest.approx(GOLDEN["dist"], abs=1e-6)
    # zero attention = the plain mean of the branches
    torch.testing.assert_close(attentive_logit([Z1, Z2], torch.zeros(2, 3)), (Z1 + Z2) / 2)


def _imf(student="cnn8", size=28, **changes):
    s, t = build_model(student, 10, 1), build_model("resnet20", 10, 1)
    ctx = MethodContext(num_classes=10, teachers=["a", "b"], student_stages=s.stage_shapes(size),
                        teacher_stages={"a": t.stage_shapes(size), "b": t.stage_shapes(size)})
    return s, build_method(MethodSection(name="imf", **changes), ctx)


@pytest.mark.parametrize("student, size", [("cnn8", 28), ("cnn4", 8), ("resnet8", 32)])
def test_exported_model_equals_the_training_time_attentive_logit_and_is_smaller(student, size):
    torch.manual_seed(0)
    s, m = _imf(student, size)
    with torch.no_grad():  # make the attention non-trivial
        m.attention.normal_()
    x = torch.randn(5, 1, size, size)
    s.eval(), m.eval()
    inf = IMFInference(s, m).eval()
    with torch.no_grad():
        _, stages = s.forward_stages(x)
        z_train = attentive_logit(m.branches(stages)[1], m.attention)
        torch.testing.assert_close(inf(x), z_train)
    assert inf.num_params() <= s.num_params()
    assert flops(inf, x[:1]) > 0 and flops(s, x[:1]) > 0
    # standalone: a fresh model of the same shape loads the exported weights and gives the same outputs
    s2, m2 = _imf(student, size)
    inf2 = IMFInference(s2, m2).eval()
    inf2.load_state_dict(inf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(inf2(x), inf(x))


def test_imf_columns_terms_and_gradients():
    torch.manual_seed(0)
    s, m = _imf()
    assert m.columns() == ["logits.a", "logits.b", "feat.a.stage1", "feat.a.stage2"]
    t = build_model("resnet20", 10, 1).eval()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad():
        za, maps = t.forward_stages(x)
    _, terms = Distiller(s, m)(x, Targets(logits={"a": za, "b": za + 1}, features={"a": maps}), y, 1)
    expect = terms["ce_att"] + terms["ce"] + 10 * terms["feat"] + 10 * terms["kd"]
    assert terms["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    terms["loss"].backward()
    assert m.attention.grad is not None and m.attention.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.ifds.parameters())
    with pytest.raises(ConfigError, match="method.imf.student_layers: 'stage7'"):
        _imf(imf={"student_layers": ["stage7"]})
    with pytest.raises(ConfigError, match="method.imf.teacher='c'"):
        _imf(imf={"teacher": "c"})


@pytest.mark.timeout(400)
def test_imf_from_the_cache_end_to_end(built, digits):
    cfg0, _ = built  # teacher b (resnet8) has stage2 and stage3 cached; cnn4's stage1/stage2 match them in size
    cfg = digits_cfg(cfg0.run.out_dir, "method.name=imf", "method.teachers=[b]", "distill.student.arch=cnn4",
                     "method.imf.teacher_layers={stage1: stage2, stage2: stage3}", "distill.optim.epochs=2",
                     "distill.optim.lr=0.1")
    rec = run_distill(cfg)
    inf = rec["inference"]
    assert inf["ifd_layers"] == ["stage1", "stage2"] and inf["stages"] == ["stage1", "stage2"]
    assert inf["params"] <= inf["student_params"] == rec["params"] and 0.1 < inf["test_acc"] <= 1
    ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
    assert [m["teachers_loaded"] for m in ms] == [0, 0] and all(m["train_feat"] > 0 for m in ms)
    # the exported file alone reproduces the recorded accuracy of the inference model
    s, m = build_model("cnn4", 10, 1), build_method(cfg.method, MethodContext(
        num_classes=10, teachers=["b"], student_stages=build_model("cnn4", 10, 1).stage_shapes(8),
        teacher_stages={"b": build_model("resnet8", 10, 1).stage_shapes(8)}))
    model = IMFInference(s, m)
    model.load_state_dict(load_state_dict(os.path.join(student_dir(cfg), "inference.safetensors")))
    acc, _ = evaluate(model, torch.from_numpy(digits.test.images), torch.from_numpy(digits.test.labels),
                      digits.mean, digits.std, "cpu")
    assert acc == pytest.approx(inf["test_acc"], abs=1e-9)
