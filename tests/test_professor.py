"""The professor stage: training on cached targets, the refined column beside untouched teacher files,
and students distilled from refined targets."""

import json
import os
import shutil

import pytest
from conftest import digits_cfg

from raykd.pipeline.cache import Cache, CacheError, inspect_cache
from raykd.pipeline.stages.distill import student_dir
from raykd.pipeline.stages.professor import run_professor
from raykd.pipeline.stages.students import run_distill

pytestmark = pytest.mark.timeout(400)


def _file_hashes(cache):
    import hashlib

    return {f["path"]: hashlib.sha256(open(os.path.join(cache.root, f["path"]), "rb").read()).hexdigest()
            for f in cache.manifest["files"]}


def _column_bytes(text):
    return {ln.split()[0]: ln.split()[-1] for ln in text.splitlines() if ln.startswith(("logits.", "feat.", "pixels"))}


@pytest.fixture(scope="module")
def professed(built, tmp_path_factory):
    """A copy of the shared cache with the professor's refined column added."""
    cfg0, _ = built
    uri = str(tmp_path_factory.mktemp("prof") / "cache")
    shutil.copytree(os.path.join(cfg0.run.out_dir, "cache"), uri)
    cfg = digits_cfg(cfg0.run.out_dir, f"cache.uri={uri}", "professor.optim.epochs=8")
    before = Cache(uri)
    hashes, text_before = _file_hashes(before), inspect_cache(uri)
    with pytest.raises(CacheError, match="run `raykd professor`"):
        run_distill(digits_cfg(cfg0.run.out_dir, f"cache.uri={uri}", "method.targets=refined"))
    entry = run_professor(cfg)
    return cfg, uri, entry, hashes, text_before


def test_professor_training_lowers_its_loss(professed):
    cfg, _, entry, _, _ = professed
    hist = [json.loads(x) for x in open(os.path.join(cfg.run.out_dir, "professor", "metrics.jsonl"))]
    assert len(hist) == 8 and hist[-1]["rec"] < hist[0]["rec"]
    assert {"rec", "cls", "adv_z", "adv_q", "d_loss", "refined_acc", "fixed_acc"} <= set(hist[0])


def test_refined_targets_refine_on_held_out_samples(professed):
    """On samples the professor never trained on: more accurate than the teachers, few right answers
    broken, much nearer the teachers' targets than the label mix (q + e_y) / 2, and the non-target
    probabilities still shaped like the teachers'."""
    _, uri, entry, _, _ = professed
    h = entry["heldout"]
    assert h["rows"] > 100
    assert h["refined_acc"] > h["teacher_acc"] and h["fixed"] > 0.3 and h["broken"] < 0.15
    assert h["tv_teachers"] < 0.5 * h["tv_label_mix"] and h["nontarget_corr"] > 0.3  # (digits: 0.05 / 0.43, 0.54)
    text = inspect_cache(uri, verify=True)  # the professor's files are verified too
    assert "professor" in text and f"{100 * entry['refined_acc']:.2f}%" in text


def test_teacher_files_untouched_by_the_refined_column(professed):
    _, uri, entry, hashes, text_before = professed
    cache = Cache(uri).expect(columns=["refined"])
    assert _file_hashes(cache) == hashes  # every teacher part file: the same bytes
    assert _column_bytes(inspect_cache(uri)) == _column_bytes(text_before)
    assert all(f["path"].startswith("refined/view=") for f in entry["files"])
    assert cache.manifest["columns"]["refined"] == "tensor<halffloat>[10]"


def test_rerun_reuses_the_refined_column(professed, capsys):
    cfg, uri, entry, _, _ = professed
    assert run_professor(cfg) == entry
    assert "up to date" in capsys.readouterr().out


def test_student_from_refined_targets(professed):
    cfg0, uri, _, _, _ = professed
    for targets in ("refined", "both"):
        cfg = digits_cfg(cfg0.run.out_dir, f"cache.uri={uri}", "method.name=kd", f"method.targets={targets}",
                         "distill.student.arch=cnn4", "distill.optim.epochs=2")
        rec = run_distill(cfg)
        assert rec["name"] == f"kd_{targets}-cnn4-s0" and rec["epochs"] == 2
        ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
        assert ms[0]["train_kd"] > 0


def test_online_student_runs_the_professor_in_the_worker(professed):
    cfg0, uri, _, _, _ = professed
    cfg = digits_cfg(cfg0.run.out_dir, f"cache.uri={uri}", "method.name=dkd", "method.targets=refined",
                     "distill.teachers=online", "distill.student.arch=cnn4", "distill.optim.epochs=1")
    rec = run_distill(cfg)
    assert rec["name"] == "dkd_refined-cnn4-s0-online" and rec["mode"] == "online"


def test_a_new_professor_replaces_the_old_one(professed, tmp_path):
    cfg0, uri, entry, hashes, _ = professed
    copy = str(tmp_path / "cache")
    shutil.copytree(uri, copy)
    cfg = digits_cfg(cfg0.run.out_dir, f"cache.uri={copy}", "professor.optim.epochs=1", "professor.seed=1")
    new = run_professor(cfg)
    assert new["fingerprint"] != entry["fingerprint"]
    cache = Cache(copy)  # the old professor's files are gone, nothing stray, the teachers' untouched
    cache.verify()
    assert cache.manifest["professor"]["fingerprint"] == new["fingerprint"] and _file_hashes(cache) == hashes
