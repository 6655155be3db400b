"""The professor's model and measurements without Ray: its losses, the held-out split and the statistics
that say whether refined targets refine (rather than mix in the label)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.methods.professor import Professor, professor_losses
from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.stages.professor import held_out, refinement_stats


def _q():
    torch.manual_seed(0)
    return F.softmax(torch.randn(64, 10) * 2, 1), torch.randint(0, 10, (64,))


def test_refinement_stats_of_the_teachers_themselves_and_of_the_label_mix():
    q, y = _q()
    same = refinement_stats(q, q, y)
    assert same["tv_teachers"] == pytest.approx(0, abs=1e-7) and same["nontarget_corr"] == pytest.approx(1, abs=1e-5)
    assert same["fixed"] == 0 and same["broken"] == 0 and same["refined_acc"] == same["teacher_acc"]
    mix = 0.5 * (q + F.one_hot(y, 10).float())
    m = refinement_stats(q, mix, y)
    assert m["tv_label_mix"] == pytest.approx(0, abs=1e-7) and m["refined_acc"] == 1.0
    assert m["tv_teachers"] == pytest.approx(0.5 * (1 - q.gather(1, y[:, None])).mean().item(), rel=1e-5)
    assert m["nontarget_corr"] == pytest.approx(1, abs=1e-5)  # mixing in e_y keeps the non-target shape
    assert m["fixed"] == 1.0 and m["entropy_refined"] != pytest.approx(m["entropy_teachers"])


def test_held_out_samples_are_a_seeded_share_agreed_on_by_any_batch():
    ids = np.arange(20_000)
    h = held_out(ids, 0.1, 0)
    assert h.mean() == pytest.approx(0.1, abs=0.01)
    assert np.array_equal(held_out(ids[::-1], 0.1, 0), h[::-1])  # a function of the id alone
    assert not np.array_equal(held_out(ids, 0.1, 1), h) and not held_out(ids, 0.0, 0).any()


def test_latent_narrower_than_the_classes():
    assert Professor(10).encoder[-1].out_features == 5
    with pytest.raises(ConfigError, match="professor.latent_dim=10 must be narrower than the 10 classes"):
        Professor(10, latent_dim=10)


def test_reconstruction_counts_only_the_samples_the_teachers_got_right():
    """Teacher-wrong samples enter only through the discriminators: their reconstruction term is 0, so
    the label-mix optimum (q + e_y) / 2 of KL + CE is gone (w_cls 0)."""
    torch.manual_seed(0)
    prof = Professor(10, temperature=1.0)
    q, y = _q()
    z = q.log()
    terms, _ = professor_losses(prof, [z], y)
    right = q.argmax(1) == y
    _, r = prof(q, y)
    per = (q * (q.log() - F.log_softmax(r, 1))).sum(1)
    assert 0 < right.sum() < len(y)
    assert terms["rec"].item() == pytest.approx(per[right].mean().item(), rel=1e-5)
    assert terms["cls"].item() > 0 and terms["loss"].item() == pytest.approx(
        (terms["rec"] + 0.1 * terms["adv_z"] + 0.1 * terms["adv_q"]).item(), rel=1e-5)


def test_per_sample_ensembles_make_the_professors_input():
    from raykd.methods.ensemble import ca_mkd_weights, mix_logits

    torch.manual_seed(0)
    za, zb, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    prof = Professor(10, temperature=2.0, ensemble="ca_mkd")
    q = prof.teacher_probs([za, zb], y)
    expect = F.softmax(mix_logits([za, zb], 2.0, ca_mkd_weights([za, zb], y)) / 2.0, 1)
    torch.testing.assert_close(q, expect)
