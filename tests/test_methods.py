"""Loss functions of the logit methods: golden values on fixed tensors, the properties the papers state,
and which parameters a step trains. No Ray, no data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import logit_methods

from raykd.methods import METHODS, MethodContext, Targets, build_method
from raykd.methods.dkd import dkd_loss, dkd_terms, warmup_factor
from raykd.methods.kd import kd_loss
from raykd.pipeline.core.config import MethodSection
from raykd.pipeline.models.zoo import build_model
from raykd.pipeline.stages.student_job import Distiller

# fixed inputs, written out so they do not depend on any RNG
ZS = torch.tensor([[-2.2517, -2.3047, -0.5012, -0.8678, 1.1977],
                   [-3.1102, -0.6827, 3.7060, 0.9362, -0.3154],
                   [2.8873, 0.5321, 2.7787, 3.1727, 1.8926],
                   [-1.6874, 1.8637, 2.5180, 4.0100, 0.1075]])
ZT = torch.tensor([[1.3191, 0.3372, 1.9224, 1.3235, 0.6166],
                   [-1.3510, -1.7192, -1.6661, 1.7830, 4.6258],
                   [1.5220, -1.7731, -3.9760, 0.5657, -0.2072],
                   [-1.4848, -4.4877, -0.5815, 1.3365, 3.9758]])
Y = torch.tensor([0, 3, 4, 1])

# Golden values, computed once with the numpy references below (float64) and kept as numbers, so a
# refactor that changes the numerics fails here even if it changes the references too.
GOLDEN = {"kd_t4": 3.6354433, "kd_t1": 2.1980054, "tckd_t4": 0.4518190, "nckd_t4": 3.8547386,
          "dkd_a1_b8_t4": 31.2897282}


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_kd(zs, zt, t):
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean() * t * t)


def ref_dkd(zs, zt, y, alpha, beta, t):
    """mdistiller's dkd_loss, written in numpy: cat_mask binary probabilities, then the -1000 masking."""
    gt = np.eye(zs.shape[1])[y]
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum(1).mean() * t * t
    ns, nt = _softmax(zs / t - 1000 * gt), _softmax(zt / t - 1000 * gt)
    keep = 1 - gt  # the target's probability is exp(-1000) = 0: leave it out of the sum
    nckd = (keep * nt * (np.log(nt + gt) - np.log(ns + gt))).sum(1).mean() * t * t
    return float(tckd), float(nckd), float(alpha * tckd + beta * nckd)


def test_kd_golden_values():
    zs, zt = ZS.double().numpy(), ZT.double().numpy()
    assert ref_kd(zs, zt, 4.0) == pytest.approx(GOLDEN["kd_t4"], rel=1e-6)
    assert ref_kd(zs, zt, 1.0) == pytest.approx(GOLDEN["kd_t1"], rel=1e-6)
    assert kd_loss(ZS, ZT, 4.0).item() == pytest.approx(GOLDEN["kd_t4"], rel=1e-5)
    assert kd_loss(ZS, ZT, 1.0).item() == pytest.approx(GOLDEN["kd_t1"], rel=1e-5)


def test_dkd_golden_values():
    tckd, nckd, total = ref_dkd(ZS.double().numpy(), ZT.double().numpy(), Y.numpy(), 1.0, 8.0, 4.0)
    assert (tckd, nckd, total) == pytest.approx((GOLDEN["tckd_t4"], GOLDEN["nckd_t4"], GOLDEN["dkd_a1_b8_t4"]), rel=1e-6)
    t, n = dkd_terms(ZS, ZT, Y, 4.0)
    assert (t.item(), n.item()) == pytest.approx((GOLDEN["tckd_t4"], GOLDEN["nckd_t4"]), rel=1e-5)
    assert dkd_loss(ZS, ZT, Y, 1.0, 8.0, 4.0).item() == pytest.approx(GOLDEN["dkd_a1_b8_t4"], rel=1e-5)


def test_kd_of_identical_logits_is_zero():
    z = torch.randn(16, 10) * 5
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    t, n = dkd_terms(z, z.clone(), torch.randint(0, 10, (16,)), 4.0)
    assert t.item() == pytest.approx(0.0, abs=1e-6) and n.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposition_identity(temperature):
    """DKD paper, eq. (5): KD = TCKD + (1 - p_t,target) * NCKD, per sample."""
    torch.manual_seed(1)
    zs, zt = torch.randn(32, 10, dtype=torch.float64) * 3, torch.randn(32, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (32,))
    tckd, nckd = dkd_terms(zs, zt, y, temperature, reduction="none")
    p_target = torch.softmax(zt / temperature, 1).gather(1, y[:, None]).squeeze(1)
    kd = kd_loss(zs, zt, temperature, reduction="none")
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd, rtol=1e-9, atol=1e-9)


def test_dkd_warmup_counts_epochs_from_one():
    assert [warmup_factor(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0


def _method(name, teachers=("a", "b"), **changes):
    cfg = MethodSection(name=name, **changes)
    return build_method(cfg, MethodContext(num_classes=5, teachers=list(teachers), teacher_val_acc={"a": 0.9, "b": 0.6},
                                           epochs=10))


def test_ensembles_of_teacher_probabilities():
    za, zb = ZT, ZS
    t = Targets(logits={"a": za, "b": zb})
    (z,) = _method("kd").soft_target(t, 4.0)  # mean_prob: softmax(z~ / tau) is the mean of the probabilities
    torch.testing.assert_close(torch.softmax(z / 4, 1), (torch.softmax(za / 4, 1) + torch.softmax(zb / 4, 1)) / 2)
    (z,) = _method("kd", ensemble="mean_logit").soft_target(t, 4.0)
    torch.testing.assert_close(z, (za + zb) / 2)
    (z,) = _method("kd", ensemble="weighted").soft_target(t, 2.0)  # weights from val accuracy: 0.6 / 0.4
    torch.testing.assert_close(torch.softmax(z / 2, 1), 0.6 * torch.softmax(za / 2, 1) + 0.4 * torch.softmax(zb / 2, 1))
    (z,) = _method("kd", ensemble="weighted", teacher_weights={"a": 1.0, "b": 3.0}).soft_target(t, 2.0)
    torch.testing.assert_close(torch.softmax(z / 2, 1), 0.25 * torch.softmax(za / 2, 1) + 0.75 * torch.softmax(zb / 2, 1))
    per = _method("kd", ensemble="per_teacher")
    terms = per(ZS, {}, Targets(logits={"a": za, "b": zb}), Y, 1)
    expect = (kd_loss(ZS, za, 4.0) + kd_loss(ZS, zb, 4.0)) / 2
    assert terms["kd"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_single_teacher_ensemble_is_that_teacher():
    m = _method("dkd", teachers=("a",))
    (z,) = m.soft_target(Targets(logits={"a": ZT}), 4.0)
    assert torch.equal(z, ZT)
    terms = m(ZS, {}, Targets(logits={"a": ZT}), Y, 20)
    assert terms["loss"].item() == pytest.approx(
        (torch.nn.functional.cross_entropy(ZS, Y) + dkd_loss(ZS, ZT, Y, 1.0, 8.0, 4.0)).item(), rel=1e-6)


def test_method_losses_are_their_weighted_terms():
    t = Targets(logits={"a": ZT, "b": ZS.flip(0)})
    kd = _method("kd")(ZS, {}, t, Y, 1)
    assert kd["loss"].item() == pytest.approx(0.1 * kd["ce"].item() + 0.9 * kd["kd"].item(), rel=1e-6)
    dkd = _method("dkd")(ZS, {}, t, Y, 5)  # warm-up 5/20
    assert dkd["loss"].item() == pytest.approx(dkd["ce"].item() + 0.25 * (dkd["tckd"].item() + 8 * dkd["nckd"].item()),
                                               rel=1e-6)
    ce = _method("ce")(ZS, {}, t, Y, 1)
    assert set(ce) == {"loss", "ce"} and _method("ce").columns() == []
    assert _method("kd").columns() == ["logits.a", "logits.b"]


@pytest.mark.parametrize("name", logit_methods())
def test_gradients_reach_exactly_the_student(name):
    """A step reaches every student parameter and the method's own modules (AEKT's serialization layer,
    SKD's simplifier), and nothing of the teachers' targets."""
    torch.manual_seed(0)
    student = build_model("cnn4", 5, 1)
    model = Distiller(student, _method(name))
    x = torch.randn(8, 1, 8, 8)
    za = torch.randn(8, 5, requires_grad=True)  # teacher targets must get no gradient
    logits, terms = model(x, Targets(logits={"a": za, "b": za.detach() * 2}), torch.randint(0, 5, (8,)), 3)
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert za.grad is None
    own = {n.split(".")[0] for n, _ in model.method.named_parameters()}
    assert own == {"aekt": {"serialize"}, "skd": {"simplifier"}}.get(name, set())
    assert all(p.grad is not None for p in model.method.parameters())


def test_teacher_targets_are_not_differentiated():
    za = torch.randn(8, 5, requires_grad=True)
    zs = torch.randn(8, 5, requires_grad=True)
    for name in ("kd", "dkd"):
        zs.grad = None
        terms = _method(name, teachers=("a",))(zs, {}, Targets(logits={"a": za.detach()}), torch.randint(0, 5, (8,)), 20)
        terms["loss"].backward()
        assert zs.grad.abs().sum() > 0


def test_registry_names_the_known_methods():
    assert {"ce", "kd", "dkd"} <= set(METHODS.names())
    with pytest.raises(ValueError, match="unknown method 'fitnet'; known: .*dkd.*kd"):
        METHODS.get("fitnet")


def test_skd_at_initialisation_is_kd():
    """The simplifier's output projection starts at zero: its target is the teacher at tau itself."""
    torch.manual_seed(0)
    t = Targets(logits={"a": ZT, "b": ZS.flip(0)})
    skd = _method("skd")(ZS, {}, t, Y, 1)
    kd = _method("kd")(ZS, {}, t, Y, 1)
    assert skd["kd"].item() == pytest.approx(kd["kd"].item(), rel=1e-6)
    assert skd["loss"].item() == pytest.approx(kd["loss"].item() + skd["simplifier_ce"].item(), rel=1e-6)
    assert skd["tau"].item() == pytest.approx(4.0)


def test_skd_simplifier_learns_from_its_own_objective_only():
    """The simplifier's gradient comes from CE(target, y), none from the student's KD term; trained on
    teacher outputs that rank the label first its target sharpens (tau(x) falls towards tau / r), on
    outputs that rank it last it softens."""
    torch.manual_seed(0)
    m = _method("skd", teachers=("a",))
    zs = ZS.clone().requires_grad_()
    terms = m(zs, {}, Targets(logits={"a": ZT}), Y, 1)
    terms["kd"].backward(retain_graph=True)
    assert m.simplifier.out.weight.grad is None or m.simplifier.out.weight.grad.abs().sum() == 0
    terms["simplifier_ce"].backward()
    assert m.simplifier.out.bias.grad.abs().sum() > 0  # the zero-initialised projection gets a gradient
    from raykd.methods.skd import simplified_logits

    # teacher logits with the label first, and with the label ranked last
    right = ZT.clone()
    right[torch.arange(4), Y] = ZT.max(1).values + 3.0
    wrong = ZT.clone()
    wrong[torch.arange(4), Y] = ZT.min(1).values - 1.0
    for zt, sharper in ((right, True), (wrong, False)):  # the per-sample optimum: tau / r or softer
        simp = _method("skd", teachers=("a",)).simplifier
        opt = torch.optim.SGD(simp.parameters(), lr=0.5)
        for _ in range(30):
            opt.zero_grad()
            z_hat, _ = simplified_logits(simp, zt, 4.0, 2.0)
            F.cross_entropy(z_hat / 4.0, Y).backward()
            opt.step()
        _, tau_x = simplified_logits(simp, zt, 4.0, 2.0)
        assert ((tau_x < 3.0) if sharper else (tau_x > 5.0)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_skd_target_is_the_teacher_at_a_bounded_per_sample_temperature(seed):
    """Whatever the simplifier's weights, its target keeps the teacher's ranking and is the teacher's
    softmax at a temperature within [tau / r, tau * r]: it cannot become the student's prediction."""
    from raykd.methods.skd import simplified_logits

    torch.manual_seed(seed)
    m = _method("skd", teachers=("a",), skd={"temperature": 2.0, "max_ratio": 3.0})
    torch.nn.init.normal_(m.simplifier.out.weight, std=5.0)
    torch.nn.init.normal_(m.simplifier.out.bias, std=5.0)
    z_hat, tau_x = simplified_logits(m.simplifier, ZT, 2.0, 3.0)
    assert (tau_x >= 2.0 / 3.0 - 1e-6).all() and (tau_x <= 6.0 + 1e-6).all() and tau_x.std() > 0
    assert torch.equal(z_hat.argsort(1), ZT.argsort(1))
    torch.testing.assert_close(F.softmax(z_hat / 2.0, 1), F.softmax(ZT / tau_x[:, None], 1))


def test_aekt_adds_no_parameter_to_the_exported_student():
    torch.manual_seed(0)
    student = build_model("cnn4", 5, 1)
    plain = build_model("cnn4", 5, 1)
    model = Distiller(student, _method("aekt"))
    assert list(model.student.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in model.student.parameters()) == plain.num_params()
    assert sum(p.numel() for p in model.method.parameters()) == 5 * 5 + 5  # the C x C layer, outside the student
    torch.testing.assert_close(model.method.serialize.weight, torch.eye(5))
    x = torch.randn(3, 5)
    torch.testing.assert_close(model.method.serialize(x), x)  # the identity at the start
    logits, terms = model(torch.randn(8, 1, 8, 8), Targets(logits={"a": torch.randn(8, 5), "b": torch.randn(8, 5)}),
                          torch.randint(0, 5, (8,)), 20)
    terms["loss"].backward()
    assert model.method.serialize.delta.grad.abs().sum() > 0  # trained with the student
    assert {"ce", "explicit", "implicit", "adaptive_w"} <= set(terms)


def test_aekt_adaptive_weight_is_detached():
    from raykd.methods.aekt import adaptive_weight, aekt_terms
    from raykd.methods.dkd import dkd_terms

    zs = ZS.clone().requires_grad_()
    w = adaptive_weight(zs, ZT, Y, 4.0, 5.0)
    assert not w.requires_grad and (w >= 0).all() and (w <= 5.0).all()
    ek, _, _, peak = aekt_terms(zs, ZT, Y, 4.0, 5.0)
    assert peak == w.max()  # unnormalised: the largest weight applied is the largest weight
    ek.backward()
    grad = zs.grad.clone()
    # the same gradient as with w held constant: no gradient flows through the weight
    zs2 = ZS.clone().requires_grad_()
    tckd, _ = dkd_terms(zs2, ZT, Y, 4.0, reduction="none")
    (w * tckd).mean().backward()
    torch.testing.assert_close(grad, zs2.grad)


def test_refined_targets_replace_or_combine():
    r = ZT.flip(0)
    t = Targets(logits={"a": ZT, "b": ZS.flip(0)}, refined=r)
    both = _method("kd", targets="both")(ZS, {}, t, Y, 1)["kd"]
    teachers = _method("kd")(ZS, {}, t, Y, 1)["kd"]
    refined = _method("kd", targets="refined")(ZS, {}, t, Y, 1)["kd"]
    assert refined.item() == pytest.approx(kd_loss(ZS, r, 4.0).item(), rel=1e-6)
    assert both.item() == pytest.approx(0.5 * teachers.item() + 0.5 * refined.item(), rel=1e-6)
    assert _method("kd", targets="refined").columns() == ["refined"]
    assert _method("dkd", targets="both").columns() == ["logits.a", "logits.b", "refined"]


def test_a_methods_version_enters_its_students_fingerprints(monkeypatch):
    """A method whose maths changed (its version bumped) gets new student fingerprints: a rerun trains
    again instead of reusing students of the old maths."""
    from raykd.methods.skd import SKD
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.distill import distill_fingerprint

    skd, kd = (load_config(None, [f"method.name={m}"]) for m in ("skd", "kd"))
    now = distill_fingerprint(skd, "data", "up")
    monkeypatch.setattr(SKD, "version", 1)
    assert distill_fingerprint(skd, "data", "up") != now
    kd_fp = distill_fingerprint(kd, "data", "up")
    monkeypatch.setattr(METHODS.get("kd"), "version", 2)
    assert distill_fingerprint(kd, "data", "up") != kd_fp


def test_a_method_declares_its_own_options_and_only_they_enter_its_fingerprint():
    """A new method is one class: its Options become method.<name>.*, validated; the fingerprinted part of
    the method section is the shared fields and the chosen method's options only."""
    from pydantic import Field

    from raykd.methods.base import METHODS as REG
    from raykd.pipeline.core.schema import Section
    from raykd.pipeline.core.train_sections import _method_section

    class ToyOptions(Section):
        gamma: float = Field(2.0, gt=0)

    @REG.register("toy_method")
    class Toy(METHODS.get("kd")):
        Options = ToyOptions

    try:
        section = _method_section()
        cfg = section(name="toy_method", toy_method={"gamma": 3.0})
        assert cfg.toy_method.gamma == 3.0
        with pytest.raises(Exception, match="greater than 0"):
            section(name="toy_method", toy_method={"gamma": -1})
        own = cfg.own()
        assert own["toy_method"] == {"gamma": 3.0} and "dkd" not in own and "kd" not in own
        assert MethodSection(name="dkd").own().keys() == MethodSection(name="dkd", kd={"w_ce": 0.5}).own().keys()
        assert MethodSection(name="dkd").own() == MethodSection(name="dkd", kd={"w_ce": 0.5}).own()
    finally:
        REG._items.pop("toy_method")
