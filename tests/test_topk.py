"""Top-k soft targets: the codec, a top-k-only cache that KD and DKD train from, the ensemble's top-k, and
the bytes a 1,000-class cache saves."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import digits_cfg, logit_methods

from raykd.pipeline.cache import Cache, CacheError, build_cache, inspect_cache, topk_decode, topk_encode
from raykd.pipeline.core.config import load_config
from raykd.pipeline.core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topk_decode_keeps_the_top_k_and_spreads_the_rest():
    torch.manual_seed(0)
    z = 3 * torch.randn(6, 10)
    tau = 4.0
    p = torch.softmax(z / tau, 1)
    values, indices = topk_encode(p, 3)
    assert values.dtype == torch.float16 and indices.dtype == torch.int16
    q = torch.softmax(topk_decode(values, indices, 10, tau) / tau, 1)  # the distribution methods see at tau
    assert torch.allclose(q.gather(1, indices.long()), values.float(), atol=1e-6)  # the top 3 as stored
    rest = torch.ones_like(q, dtype=torch.bool).scatter_(1, indices.long(), False)
    tail = q[rest].view(6, 7)
    assert torch.allclose(tail, tail[:, :1].expand(-1, 7))  # the other 7 share what is left evenly
    assert torch.allclose(q.sum(1), torch.ones(6))
    full = torch.softmax(topk_decode(*topk_encode(p, 10), 10, tau) / tau, 1)  # k = C: the teacher itself
    assert torch.allclose(full, p, atol=2e-3)  # within fp16


def test_topk_config():
    cfg = load_config(None, ["cache.topk=5"])
    assert cfg.cache.topk.k == 5 and cfg.cache.topk.of == "teachers" and cfg.cache.topk.temperature == 4.0
    with pytest.raises(ConfigError, match="no teacher targets"):
        load_config(None, ["cache.logits=false"])
    with pytest.raises(ConfigError, match="'ensemble' is the cache's name"):
        load_config(None, ["teachers.models=[{name: ensemble, arch: cnn4}]"])


@pytest.fixture(scope="module")
def topk_cache(built, tmp_path_factory):
    """The shared teachers' top-3 only (no full logits), K=2."""
    cfg0, _ = built
    uri = str(tmp_path_factory.mktemp("topk") / "cache")
    cfg = digits_cfg(cfg0.run.out_dir, f"cache.uri={uri}", "cache.logits=false", "cache.topk={k: 3}", "cache.layers={}")
    return cfg, build_cache(cfg)


def _accuracies(text):
    return {ln.split()[0]: ln.split()[-1] for ln in text.splitlines() if ln.startswith(("a ", "b "))}


def test_a_topk_only_cache_holds_no_logits_and_says_what_it_holds(built, topk_cache):
    cfg, m = topk_cache
    assert m["targets"] == {"logits": False, "topk": {"k": 3, "of": "teachers", "temperature": 4.0}}
    assert not [c for c in m["columns"] if c.startswith("logits.")]
    assert m["columns"]["topk.a.probs"] == "tensor<halffloat>[3]" and m["columns"]["topk.b.indices"] == "tensor<int16>[3]"
    cache = Cache(cfg.cache.uri)
    assert cache.sources == ["a", "b"] and cache.target_columns("a") == ["topk.a.probs", "topk.a.indices"]
    text = inspect_cache(cfg.cache.uri)
    assert "top-3 probabilities at tau 4 of each teacher" in text
    # the top-1 class survives: each teacher's accuracy on its cached views is the full logits' (same views),
    # but for rows whose two best probabilities round to the same fp16 value
    topk_acc, full_acc = _accuracies(text), _accuracies(inspect_cache(os.path.join(built[0].run.out_dir, "cache")))
    assert topk_acc.keys() == full_acc.keys() == {"a", "b"}
    assert all(abs(float(topk_acc[t][:-1]) - float(full_acc[t][:-1])) < 0.5 for t in topk_acc)


@pytest.mark.parametrize("method", logit_methods(with_teachers=True))
def test_logit_methods_train_from_top_k_only(topk_cache, method):
    from raykd.pipeline.stages.distill import student_dir
    from raykd.pipeline.stages.students import run_distill

    cfg, _ = topk_cache
    run = digits_cfg(cfg.run.out_dir, f"cache.uri={cfg.cache.uri}", "cache.logits=false", "cache.topk={k: 3}",
                     "cache.layers={}", f"method.name={method}", "distill.student.arch=cnn4", "distill.optim.epochs=3",
                     "distill.optim.lr=0.1", f"distill.name=topk-{method}")
    rec = run_distill(run)
    ms = [json.loads(x) for x in open(os.path.join(student_dir(run), "metrics.jsonl"))]
    assert rec["teachers"] == ["a", "b"] and [m["teachers_loaded"] for m in ms] == [0, 0, 0]
    terms = {"kd": ("train_kd",), "dkd": ("train_tckd", "train_nckd"), "aekt": ("train_explicit", "train_implicit"),
             "skd": ("train_kd", "train_tau")}.get(method) or [  # a new method: its own terms
        k for k in ms[0] if k.startswith("train_") and k not in ("train_loss", "train_ce", "train_acc")]
    assert all(ms[0][t] > 0 for t in terms)  # the rebuilt targets are in the loss
    assert rec["test_acc"] > 0.3  # 3 epochs of a 1.7k-parameter CNN: far above chance (0.1)


def test_the_ensembles_top_k_is_one_source(built, tmp_path):
    from raykd.pipeline.stages.students import run_distill

    cfg0, _ = built
    common = [f"cache.uri={tmp_path / 'cache'}", "cache.logits=false", "cache.topk={k: 3, of: ensemble}",
              "cache.layers={}"]
    build_cache(digits_cfg(cfg0.run.out_dir, *common))
    cache = Cache(str(tmp_path / "cache"))
    assert cache.sources == ["ensemble"] and sorted(c for c in cache.manifest["columns"] if c.startswith("topk")) == [
        "topk.ensemble.indices", "topk.ensemble.probs"]
    rec = run_distill(digits_cfg(cfg0.run.out_dir, *common, "method.name=kd", "distill.student.arch=cnn4",
                                 "distill.optim.epochs=2", "distill.name=topk-ens"))
    assert rec["teachers"] == ["ensemble"] and rec["epochs"] == 2
    with pytest.raises(CacheError, match=r"no targets of 'a' in the cache \(it holds top-3 of \['ensemble'\]\)"):
        run_distill(digits_cfg(cfg0.run.out_dir, *common, "method.name=kd", "method.teachers=[a]",
                               "distill.name=topk-ens-a"))


def test_a_thousand_class_cache_costs_what_the_readme_says(ray_session, tmp_path):
    """Three random 1,000-class teachers on 64 random images (the bytes depend on the shapes only)."""
    spec = importlib.util.spec_from_file_location("bench_topk", os.path.join(ROOT, "bench", "topk.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.class_bytes(str(tmp_path))
    full, per_teacher, ensemble = (out[k]["bytes_per_view_row"] for k in
                                   ("full fp16 logits", "per-teacher top-5", "ensemble top-5"))
    assert 5000 < full < 7000  # 3 x 1,000 fp16 logits (6,000 B) barely compress
    assert per_teacher < 100 and ensemble < 40  # 3 x (5 fp16 + 5 int16) and 1 x (5 + 5): ~30 and ~10 B before Parquet's overhead
    assert sorted(out["per-teacher top-5"]["columns"]) == [f"topk.t{i}.{p}" for i in range(3) for p in ("indices", "probs")]


def test_the_professor_refines_top_k_targets(topk_cache, tmp_path):
    """The professor trains on the rebuilt top-k targets and writes its refined column; a student uses both."""
    import shutil

    from raykd.pipeline.stages.professor import run_professor
    from raykd.pipeline.stages.students import run_distill

    cfg, _ = topk_cache
    uri = str(tmp_path / "cache")
    shutil.copytree(cfg.cache.uri, uri)
    common = [f"cache.uri={uri}", "cache.logits=false", "cache.topk={k: 3}", "cache.layers={}"]
    entry = run_professor(digits_cfg(str(tmp_path / "out"), *common, "professor.optim.epochs=2"))
    assert entry["refined_acc"] > 0.2 and all(f["path"].startswith("refined/view=") for f in entry["files"])  # 2 epochs; chance 0.1
    rec = run_distill(digits_cfg(str(tmp_path / "out"), *common, "method.name=kd", "method.targets=both",
                                 "distill.student.arch=cnn4", "distill.optim.epochs=2", "distill.name=topk-both"))
    assert rec["epochs"] == 2 and rec["teachers"] == ["a", "b"]
