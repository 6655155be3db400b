"""Test accuracy of every method over paired seeds, all students distilled from the same caches.

    python bench/accuracy.py -c configs/bench.yaml [--seeds 0 1 2 3 4] [--methods ce kd ...]
                             [--teachers-on-all-data] [key=value ...]

Teachers (with `--teachers-on-all-data`: trained on every training image, then loaded by checkpoint
for the students' subset), two caches — logits only with K = the students' epochs (every epoch a new
view, so cached and online KD are the same experiment: the A/A row), and K = `cache.views` with the
feature maps FEED and IMF read — and (when a method needs it) the professor are built first or reused;
then one student per (method, seed) with `raykd distill` (`run.parallel` at a time), the seed being
the student's initialisation and shuffling seed. Each row: mean, sample std and 95 % confidence
interval (Student's t) over seeds, and the paired difference to CE and to KD (per seed, then its mean
and 95 % CI). Writes bench/results/accuracy_<dataset>.json (or --out). With `--into FILE`, the rows of
the methods run replace theirs in an earlier result FILE, and FILE's `reruns` records this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stats import ci, paired  # noqa: E402  (bench/stats.py, beside this script)

from raykd.pipeline.cache import Cache, build_cache, cache_uri  # noqa: E402
from raykd.pipeline.core.config import load_config, variant  # noqa: E402
from raykd.pipeline.core.errors import StageFailed  # noqa: E402
from raykd.pipeline.stages.distill import student_dir, student_name
from raykd.pipeline.stages.students import run_students  # noqa: E402
from raykd.pipeline.stages.teachers import run_teachers  # noqa: E402

# method -> (config changes, the cache it reads); "<best>" is the teacher with the best validation accuracy,
# "<smallest>" the one with the fewest parameters (the A/A pair: its online forward is the cheapest)
LOGITS, FEATURES = "logits", "features"
VARIANTS = {
    "ce": ({"method.name": "ce"}, LOGITS),
    "kd_best": ({"method.name": "kd", "method.teachers": "<best>"}, LOGITS),
    "kd_aa_cached": ({"method.name": "kd", "method.teachers": "<smallest>"}, LOGITS),
    "kd_aa_online": ({"method.name": "kd", "method.teachers": "<smallest>", "distill.teachers": "online"}, LOGITS),
    "kd": ({"method.name": "kd"}, LOGITS),
    "kd_weighted": ({"method.name": "kd", "method.ensemble": "weighted", "method.weight_temperature": 0.01}, LOGITS),
    "kd_ca_mkd": ({"method.name": "kd", "method.ensemble": "ca_mkd"}, LOGITS),
    "kd_entropy": ({"method.name": "kd", "method.ensemble": "entropy"}, LOGITS),
    "kd_ae_kd": ({"method.name": "kd", "method.ensemble": "ae_kd"}, LOGITS),
    "kd_wce1": ({"method.name": "kd", "method.kd.w_ce": 1.0}, LOGITS),
    "label_mix": ({"method.name": "kd", "method.targets": "label_mix"}, LOGITS),
    "professor_kd": ({"method.name": "kd", "method.targets": "both"}, LOGITS),
    "professor_refined": ({"method.name": "kd", "method.targets": "refined"}, LOGITS),
    "dkd": ({"method.name": "dkd"}, LOGITS),
    "aekt": ({"method.name": "aekt"}, LOGITS),
    "aekt_norm": ({"method.name": "aekt", "method.aekt.normalize": True}, LOGITS),
    "skd": ({"method.name": "skd"}, LOGITS),
    # SKD's reduction when its per-sample temperature sits at the floor tau / r (r = 2): KD with the teacher at 2
    "skd_fixed": ({"method.name": "kd", "method.kd.teacher_temperature": 2.0}, LOGITS),
    # FEED's and IMF's baselines on their own (K = cache.views) cache
    "ce_features": ({"method.name": "ce"}, FEATURES),
    "kd_features": ({"method.name": "kd"}, FEATURES),
    "pfeed": ({"method.name": "feed"}, FEATURES),
    "sfeed": ({"method.name": "feed", "method.feed.generations": 2}, FEATURES),
    "imf": ({"method.name": "imf"}, FEATURES),
    # IMF's controls: its inference architecture trained without the matched features (alpha 0), from the
    # labels alone (beta 0 too) or with KD at IMF's beta on the attentive logit
    "imf_ce": ({"method.name": "imf", "method.imf.alpha": 0.0, "method.imf.beta": 0.0}, FEATURES),
    "imf_kd": ({"method.name": "imf", "method.imf.alpha": 0.0}, FEATURES),
}
SLOW = ("kd_aa_online", "pfeed", "sfeed", "imf", "imf_ce", "imf_kd")  # started first: none runs alone at the end


def row_changes(m: str, best: str, smallest: str) -> dict:
    """Row m's config changes, its teacher placeholders resolved."""
    return {k: {"<best>": [best], "<smallest>": [smallest]}.get(v, v) if isinstance(v, str) else v
            for k, v in VARIANTS[m][0].items()}


def _rounded(d: dict | None) -> dict | None:
    return d and {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def _row(recs: list[dict], seeds: list[int], key=lambda r: r) -> dict:
    """Mean, std and 95 % CI over seeds of test (and, when recorded, val) accuracy; the per-seed values."""
    row = {"per_seed": {s: key(r)["test_acc"] for s, r in zip(seeds, recs)}}
    for split in ("test", "val"):
        if all(f"{split}_acc" in key(r) for r in recs):
            mean, sd, half = ci([key(r)[f"{split}_acc"] for r in recs])
            row.update({f"{split}_acc_mean": round(mean, 5), f"{split}_acc_std": round(sd, 5),
                        f"{split}_acc_ci95": round(half, 5)})
    return row


def _curve(cfg, rec: dict) -> list[float]:
    """Validation accuracy per epoch of a finished student (its metrics.jsonl)."""
    path = os.path.join(student_dir(variant(cfg, {"distill.name": rec["name"]}, "bench")), "metrics.jsonl")
    return [round(json.loads(line)["val_acc"], 5) for line in open(path)]


def _pair_all(rows: dict) -> None:
    """Every row's paired differences to CE and to KD (the teachers' mean probability), over common seeds:
    after a rerun's rows are merged, so that they pair with the earlier run's baselines too."""
    for m, r in rows.items():
        for base in ("ce", "kd"):
            if "per_seed" not in r or "per_seed" not in rows.get(base, {}):
                continue
            if base != m:
                r[f"vs_{base}"] = _rounded(paired(r, rows[base]))
            if "inference" in r:
                r["inference"][f"vs_{base}"] = _rounded(paired(r["inference"], rows[base]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--teachers-on-all-data", action="store_true",
                    help="train the teachers on every training image (data.train_subset only for the students)")
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None, help="default bench/results/accuracy_<dataset>.json")
    ap.add_argument("--one-cache", action="store_true",
                    help="every row reads the features cache (K = cache.views): CE and KD are then FEED's and IMF's "
                         "baselines on their own cache, and the *_features rows are not needed")
    ap.add_argument("--into", default=None, help="replace these methods' rows in this earlier result file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    if args.teachers_on_all_data:  # every training image for the teachers, then their checkpoints for the rest
        tcfg = variant(cfg, {"data.train_subset": None, "run.out_dir": cfg.run.out_dir + "-teachers"}, "bench teachers")
        run_teachers(tcfg)
        from raykd.pipeline.stages.teachers import teacher_dir

        cfg = variant(cfg, {f"teachers.models.{i}.checkpoint": os.path.join(teacher_dir(
            os.path.abspath(tcfg.run.out_dir), t.name), "best.safetensors") for i, t in enumerate(cfg.teachers.models)},
            "bench teachers")
    teachers = run_teachers(cfg)
    t_teachers = time.time() - t0
    epochs = cfg.distill.optim.epochs
    caches = {  # the logits-only cache: K = epochs; the features cache: the config's own
        LOGITS: {"cache.uri": os.path.join(os.path.abspath(cfg.run.out_dir), "cache-logits"),
                 "cache.views": max(epochs, cfg.cache.views), "cache.layers": {}},
        FEATURES: {},
    }
    best = max(teachers, key=lambda t: t["val_acc"])["name"]
    smallest = min(teachers, key=lambda t: t["params"])["name"]
    methods = [m for m in args.methods]
    kind_of = {m: FEATURES if args.one_cache else VARIANTS[m][1] for m in methods}
    if args.one_cache and (same := [m for m in methods if m.endswith("_features")]):
        ap.error(f"--one-cache: {', '.join(same)} would repeat the ce / kd rows on the same cache")
    needed = set(kind_of.values())
    manifests = {}
    for kind in (LOGITS, FEATURES):
        if kind in needed:
            manifests[kind] = build_cache(variant(cfg, caches[kind], f"bench {kind} cache"))
    t_cache = time.time() - t0 - t_teachers

    def changes(m: str, s: int) -> dict:
        return {**caches[kind_of[m]], **row_changes(m, best, smallest), "distill.student.seed": s,
                "distill.name": f"acc-{m}-s{s}"}

    runs = {m: [variant(cfg, changes(m, s), f"bench method {m}") for s in args.seeds] for m in methods}
    prof = None
    profs = {}
    for m, rs in runs.items():
        if rs[0].method.targets in ("refined", "both") and kind_of[m] not in profs:
            from raykd.pipeline.stages.professor import run_professor

            profs[kind_of[m]] = prof = run_professor(rs[0])
    order = sorted(runs, key=lambda m: m not in SLOW)
    flat = [r for m in order for r in runs[m]]
    t1 = time.time()
    failed: dict[str, str] = {}
    try:
        records = run_students(flat, cfg.run.parallel)
    except StageFailed as e:  # a student that diverged is a result too: its row says so, the others stand
        failed, records = e.failed, e.records
    t_students = time.time() - t1
    records = iter(records)
    recs = {m: [next(records) for _ in runs[m]] for m in order}
    rows = {}
    for m in methods:
        seeds = [s for s, r in zip(args.seeds, recs[m]) if r is not None]
        rs = [r for r in recs[m] if r is not None]
        lost = {s: failed.get(student_name(c), "failed") for s, c, r in zip(args.seeds, runs[m], recs[m]) if r is None}
        if not rs:
            rows[m] = {"failed": lost, "cache": kind_of[m]}
            continue
        rows[m] = {**_row(rs, seeds), **({"failed": lost} if lost else {}), "params": rs[0]["params"], "method_params": rs[0].get("method_params"),
                   "cache": kind_of[m],
                   # wall time per student, students sharing the cores (run.parallel at a time)
                   "train_time_s": round(statistics.median(r["wall_time_s"] for r in rs), 1),
                   "epoch_time_s": round(statistics.median(r["epoch_time_s"] for r in rs), 2),
                   "val_curve": [round(statistics.mean(c), 5) for c in zip(*(_curve(cfg, r) for r in rs))]}
        if m == "kd_best" or m.startswith("kd_aa"):
            rows[m]["teacher"] = best if m == "kd_best" else smallest
        if "inference" in rs[0]:  # IMF: the exported inference model
            inf = [r["inference"] for r in rs]
            rows[m]["inference"] = {**_row(inf, seeds), "params": inf[0]["params"], "flops": inf[0]["flops"],
                                    "student_flops": inf[0]["student_flops"]}
        if "generations" in rs[0]:  # sequential FEED: every generation
            rows[m]["generations"] = [_row(rs, seeds, key=lambda r, g=g: r["generations"][g])
                                      for g in range(len(rs[0]["generations"]))]
    manifest = manifests.get(FEATURES) or manifests[LOGITS]
    cfg = variant(cfg, caches[FEATURES if FEATURES in manifests else LOGITS], "bench cache")
    cols = Cache(cache_uri(cfg), cfg.cache.s3_endpoint).column_bytes()
    feat = sum(b for c, b in cols.items() if c.startswith("feat."))
    n = manifest["dataset"]["train_samples"]
    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "train_samples": n, "views": manifest["views"],
        "student": cfg.distill.student.arch, "epochs": cfg.distill.optim.epochs, "batch_size": cfg.distill.optim.batch_size,
        "lr": cfg.distill.optim.lr,
        "parallel": cfg.run.parallel, "seeds": args.seeds,
        "teachers": {t["name"]: {"arch": t["arch"], "params": t.get("params"), "val_acc": t["val_acc"],
                                 "test_acc": t["test_acc"]} for t in teachers},
        "best_teacher": best, "professor_refined_acc": prof["refined_acc"] if prof else None,
        "professor": {k: {"refined_acc": p["refined_acc"], "ensemble_acc": p["ensemble_acc"], "heldout": p.get("heldout")}
                      for k, p in profs.items()},
        "teachers_on_all_data": args.teachers_on_all_data, "one_cache": args.one_cache,
        "views_per_cache": {k: mf["views"] for k, mf in manifests.items()},
        "cache": {"bytes": manifest["bytes"], "feat_dtype": cfg.cache.feat_dtype, "layers": cfg.cache.layers,
                  "bytes_per_sample": round(manifest["bytes"] / n, 1),
                  "bytes_per_sample_without_features": round((manifest["bytes"] - feat) / n, 1),
                  "bytes_per_column": cols, "build_s": round(manifest["build_seconds"], 1)},
        "methods": rows,
        "time_s": {"teachers": round(t_teachers, 1), "cache": round(t_cache, 1), "students": round(t_students, 1),
                   "total": round(time.time() - t0, 1)},
    }
    out = args.into or args.out or f"bench/results/accuracy_{cfg.data.name.replace('-', '_')}.json"
    if args.into:
        with open(args.into) as f:
            earlier = json.load(f)
        earlier["methods"].update(rows)
        earlier.setdefault("reruns", []).append({"command": cmd, "date": res["date"], "methods": list(rows),
                                                 "time_s": res["time_s"]})
        res = earlier
    res = json.loads(json.dumps(res))  # seeds as the file keeps them (strings), for this run's rows and an earlier one's alike
    _pair_all(res["methods"])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| method | test acc (mean ± 95 % CI, {len(args.seeds)} seeds) | vs CE | vs KD |")
    print("|---|---|---|---|")
    d = lambda x: "—" if not x else f"{100 * x['mean']:+.2f} ± {100 * x['ci95']:.2f}"  # noqa: E731
    for m, r in ((m, res["methods"][m]) for m in rows):
        if "test_acc_mean" not in r:
            print(f"| {m} | failed in every seed | — | — |")
            continue
        print(f"| {m} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_ci95']:.2f} | {d(r.get('vs_ce'))} | "
              f"{d(r.get('vs_kd'))} |" + (f" failed in seeds {sorted(r['failed'])}" if r.get("failed") else ""))
    print(f"\nwritten {out} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
