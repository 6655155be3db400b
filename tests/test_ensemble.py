"""Multi-teacher ensembles (methods/ensemble.py): every weighting rule against a numpy reference of its
paper's formula, golden numbers, and the rules reaching KD, DKD, AEKT and the logged weights. No Ray."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from raykd.methods import MethodContext, Targets, build_method
from raykd.methods.ensemble import ae_kd_weights, ca_mkd_weights, capped_min_norm_weights, entropy_weights, mix_logits
from raykd.methods.kd import kd_loss
from raykd.pipeline.core.config import MethodSection

# three teachers, four samples, five classes; fixed numbers, no RNG
ZA = np.array([[1.3191, 0.3372, 1.9224, 1.3235, 0.6166], [-1.3510, -1.7192, -1.6661, 1.7830, 4.6258],
               [1.5220, -1.7731, -3.9760, 0.5657, -0.2072], [-1.4848, -4.4877, -0.5815, 1.3365, 3.9758]])
ZB = np.array([[-2.2517, -2.3047, -0.5012, -0.8678, 1.1977], [-3.1102, -0.6827, 3.7060, 0.9362, -0.3154],
               [2.8873, 0.5321, 2.7787, 3.1727, 1.8926], [-1.6874, 1.8637, 2.5180, 4.0100, 0.1075]])
ZC = np.array([[3.0, 0.1, -1.0, 0.2, 0.0], [0.0, 0.3, 0.1, 2.5, -0.5],
               [0.2, 0.2, 0.1, 0.1, 0.4], [-2.0, 3.5, -1.0, 0.5, 0.0]])
ZS = np.array([[0.5, -0.2, 0.1, 0.0, 0.3], [0.1, 0.2, 0.0, 0.9, 1.1], [0.0, 0.0, 0.0, 0.0, 0.0],
               [-0.3, 0.8, 0.2, 0.6, 0.1]])
Y = np.array([0, 3, 4, 1])
T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731

# Golden values from the numpy references below (float64), kept as numbers so that a change to the
# formulas fails here even if it changes the references too.
GOLDEN_CA = [[0.4520782, 0.0599870, 0.4879348], [0.2535165, 0.2644733, 0.4820102],
             [0.3047626, 0.2842552, 0.4109821], [0.0012376, 0.4988685, 0.4998939]]
GOLDEN_ENT = [[0.2550839, 0.3511656, 0.3937504], [0.4168035, 0.3782808, 0.2049156],
              [0.3764063, 0.3251997, 0.2983940], [0.3940562, 0.2337180, 0.3722259]]


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_ca_mkd(zs, y):
    """CA-MKD: w_k = (1 - exp(CE_k) / sum_j exp(CE_j)) / (K - 1), CE_k = -log p_k[y]."""
    ce = np.stack([-np.log(softmax(z)[np.arange(len(y)), y]) for z in zs], 1)
    return (1 - np.exp(ce) / np.exp(ce).sum(1, keepdims=True)) / (len(zs) - 1)


def ref_entropy(zs):
    """EBKD: w_k = 1 - H_k / sum_j H_j, divided by K - 1."""
    h = np.stack([-(softmax(z) * np.log(softmax(z))).sum(1) for z in zs], 1)
    return (1 - h / h.sum(1, keepdims=True)) / (len(zs) - 1)


def ref_min_norm(grads, cap=1.0):
    """The min-norm point of the capped convex hull of the rows of `grads` (weights on the simplex, each
    at most `cap`), by a general-purpose solver."""
    k = len(grads)
    m = grads @ grads.T
    res = minimize(lambda w: w @ m @ w, np.full(k, 1 / k), jac=lambda w: 2 * m @ w, method="SLSQP",
                   bounds=[(0, cap)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                   options={"ftol": 1e-15, "maxiter": 500})
    return res.x, res.fun


def test_ca_mkd_weights_match_the_reference_and_golden_values():
    w = ca_mkd_weights([T(z) for z in (ZA, ZB, ZC)], torch.tensor(Y))
    ref = ref_ca_mkd([ZA, ZB, ZC], Y)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), GOLDEN_CA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, rtol=1e-6)
    # the teacher with the lowest cross-entropy on the label weighs most, per sample
    ce = np.stack([-np.log(softmax(z)[np.arange(4), Y]) for z in (ZA, ZB, ZC)], 1)
    assert (w.argmax(1).numpy() == ce.argmin(1)).all()


def test_entropy_weights_match_the_reference_and_golden_values():
    w = entropy_weights([T(z) for z in (ZA, ZB, ZC)])
    np.testing.assert_allclose(w.numpy(), ref_entropy([ZA, ZB, ZC]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.numpy(), GOLDEN_ENT, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, rtol=1e-6)
    h = np.stack([-(softmax(z) * np.log(softmax(z))).sum(1) for z in (ZA, ZB, ZC)], 1)
    assert (w.argmax(1).numpy() == h.argmin(1)).all()  # the most confident teacher weighs most


@pytest.mark.parametrize("seed", range(8))
def test_capped_min_norm_weights_match_a_general_solver(seed):
    """The nu-SVM solution is the min-norm point of the capped simplex, with the cap binding or not."""
    rng = np.random.default_rng(seed)
    k = 3 + seed % 3
    grads = rng.normal(size=(k, 40)) + (rng.normal(size=40) if seed % 2 else 0)  # with and without a shared part
    cap = (0.6, 0.45, 1.0, 0.4)[seed % 4]  # at least 1 / K: feasible
    w = capped_min_norm_weights(torch.tensor(grads), cap).numpy()
    ref, fun = ref_min_norm(grads, cap)
    assert w.min() >= -1e-9 and w.max() <= cap + 1e-6 and w.sum() == pytest.approx(1.0)
    assert w @ (grads @ grads.T) @ w == pytest.approx(fun, rel=1e-3, abs=1e-8)
    np.testing.assert_allclose(w, ref, atol=5e-3)


def test_the_cap_binds_where_one_teacher_sits_on_the_student():
    """A teacher whose gradient is ~0 takes all the weight unbounded; the cap holds it at C and gives the
    rest to the others (here the next nearest)."""
    g = np.array([[1e-3, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 1.0]])
    unbounded, _ = ref_min_norm(g)
    assert unbounded[0] > 0.99
    w = capped_min_norm_weights(torch.tensor(g), 0.6).numpy()
    assert w[0] == pytest.approx(0.6, abs=1e-4) and w[1] > w[2]
    np.testing.assert_allclose(w, ref_min_norm(g, 0.6)[0], atol=2e-3)
    # a cap below 1 / K reads as 1 / K: the uniform weights, as the official code clamps nu to 1
    np.testing.assert_allclose(capped_min_norm_weights(torch.tensor(g), 0.1).numpy(), 1 / 3, atol=1e-6)


def test_ae_kd_weights_are_the_capped_min_norm_weights_of_the_batch_mean_kd_gradients():
    """The teachers' gradients of tau^2 KL / tau^2 ... w.r.t. the student logits are (p_s - p_k) / tau per
    sample; averaged over the batch (the official code's batch-level gradient), their capped min-norm
    weights are the same for every sample of the batch."""
    tau = 2.0
    zs = [T(z) for z in (ZA, ZB, ZC)]
    w = ae_kd_weights(zs, T(ZS), tau, cap=0.6)
    grads = np.stack([((softmax(ZS / tau) - softmax(z / tau)) / tau).mean(0) for z in (ZA, ZB, ZC)])
    ref, _ = ref_min_norm(grads, 0.6)
    np.testing.assert_allclose(w[0].numpy(), ref, atol=2e-3)
    assert w.max() <= 0.6 + 1e-6
    assert torch.equal(w, w[:1].expand(4, -1))
    # and autograd agrees that (p_s - p_k) / tau is the gradient of KL(p_k || p_s) at tau, per sample
    s = T(ZS).requires_grad_()
    F.kl_div(F.log_softmax(s / tau, 1), F.softmax(zs[0] / tau, 1), reduction="sum").backward()
    np.testing.assert_allclose(s.grad.numpy(), (softmax(ZS / tau) - softmax(ZA / tau)) / tau, atol=1e-6)


def test_mix_logits_with_per_sample_weights():
    w = torch.tensor(GOLDEN_CA, dtype=torch.float32)
    z = mix_logits([T(ZA), T(ZB), T(ZC)], 4.0, w)
    expect = sum(np.asarray(GOLDEN_CA)[:, [k]] * softmax(zk / 4.0) for k, zk in enumerate((ZA, ZB, ZC)))
    np.testing.assert_allclose(F.softmax(z / 4.0, 1).numpy(), expect, rtol=1e-5)


def _method(name, **changes):
    ctx = MethodContext(num_classes=5, teachers=["a", "b", "c"], teacher_val_acc={"a": 0.86, "b": 0.855, "c": 0.81},
                        epochs=10)
    return build_method(MethodSection(name=name, **changes), ctx)


TARGETS = Targets(logits={"a": T(ZA), "b": T(ZB), "c": T(ZC)})


@pytest.mark.parametrize("mode", ["ca_mkd", "entropy", "ae_kd"])
def test_kd_distils_from_the_per_sample_mixture_and_logs_its_weights(mode):
    m = _method("kd", ensemble=mode)
    s = T(ZS)
    terms = m(s, {}, TARGETS, torch.tensor(Y), 1)
    if mode == "ca_mkd":
        w = ref_ca_mkd([ZA, ZB, ZC], Y)
    elif mode == "entropy":
        w = ref_entropy([ZA, ZB, ZC])
    else:
        w = ae_kd_weights([T(ZA), T(ZB), T(ZC)], s, 4.0).numpy()
    target = sum(w[:, [k]] * softmax(zk / 4.0) for k, zk in enumerate((ZA, ZB, ZC)))
    expect = kd_loss(s, torch.tensor(4.0 * np.log(target), dtype=torch.float32), 4.0)
    assert terms["kd"].item() == pytest.approx(expect.item(), rel=1e-5)
    for k, t in enumerate("abc"):  # the weights' batch mean and spread, per teacher
        assert m.logged[f"w.{t}"].item() == pytest.approx(w[:, k].mean(), rel=1e-5)
        assert m.logged[f"w_sd.{t}"].item() == pytest.approx(w[:, k].std(), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("name", ["dkd", "aekt"])
def test_dkd_and_aekt_take_the_per_sample_ensembles(name):
    plain = _method(name)(T(ZS), {}, TARGETS, torch.tensor(Y), 20)
    ca = _method(name, ensemble="ca_mkd")(T(ZS), {}, TARGETS, torch.tensor(Y), 20)
    assert torch.isfinite(ca["loss"]) and ca["loss"].item() != pytest.approx(plain["loss"].item(), rel=1e-3)


def test_weighted_by_val_acc_with_a_temperature():
    assert _method("kd", ensemble="weighted").teacher_weights() == pytest.approx(
        {"a": 0.86 / 2.525, "b": 0.855 / 2.525, "c": 0.81 / 2.525})
    w = _method("kd", ensemble="weighted", weight_temperature=0.01).teacher_weights()
    e = np.exp(np.array([0.86, 0.855, 0.81]) / 0.01)
    assert list(w.values()) == pytest.approx(list(e / e.sum()))
    assert w["a"] > 0.6 and w["c"] < 0.01
    with pytest.raises(ValueError, match="weight_temperature applies only to ensemble: weighted"):
        MethodSection(name="kd", weight_temperature=0.1)


def test_label_mix_targets_are_half_teacher_half_label():
    m = _method("kd", targets="label_mix")
    (_, z), = m.soft_targets(TARGETS, 4.0, torch.tensor(Y), T(ZS))
    q = sum(softmax(zk / 4.0) for zk in (ZA, ZB, ZC)) / 3
    np.testing.assert_allclose(F.softmax(z / 4.0, 1).numpy(), (q + np.eye(5)[Y]) / 2, rtol=1e-5)
    assert m.columns() == ["logits.a", "logits.b", "logits.c"]  # no refined column needed
