"""Top-k soft targets: KD and DKD from a top-k-only cache against the full logits, and what each costs per row.

    python bench/topk.py -c configs/bench_speed.yaml --k 3 --seeds 0 1 2 --out bench/results/topk.json [key=value ...]

Part 1 (Fashion-MNIST, the config's teachers, reused when trained): two caches of the same views, one
with every teacher's full fp16 logits, one with only each teacher's top-k probabilities at tau
(`cache.logits: false`, `cache.topk: {k}`); KD and DKD students from each, over `--seeds`; test
accuracy (mean and std) and the targets' bytes per view row, from the Parquet footers.
Part 2 (no training): the targets' bytes per view row of a 1,000-class cache of three teachers —
full fp16 logits, per-teacher top-5, the ensemble's top-5 — measured on a few rows of random images
through three teachers with random weights (`class_bytes`; the storage cost depends on the shapes,
not on what the teachers know). tests/test_topk.py runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def target_bytes(uri: str) -> dict[str, float]:
    """Compressed bytes per view row of each target column (logits.*, topk.*) of a cache."""
    from raykd.pipeline.cache import Cache
    from raykd.pipeline.cache import columns as C

    cache = Cache(uri)
    rows = cache.manifest["rows"]
    return {c: round(b / rows, 1) for c, b in sorted(cache.column_bytes().items())
            if C.parse(c).kind in ("logits", "topk")}


def class_bytes(out_dir: str, num_classes: int = 1000, teachers: int = 3, rows: int = 64, k: int = 5) -> dict:
    """Targets' bytes per view row of three caches (full fp16 logits, per-teacher top-k, ensemble top-k) of
    random images through `teachers` random-weight cnn4 teachers with `num_classes` classes. Registers a
    synthetic data set `random-<num_classes>` (in this process) for it."""
    import numpy as np

    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.datasets import DATASETS, Raw
    from raykd.pipeline.data.views import ViewPolicy
    from raykd.pipeline.models.checkpoints import save_state_dict
    from raykd.pipeline.models.zoo import build_model
    from raykd.pipeline.stages.teachers import run_teachers

    name = f"random-{num_classes}"
    if name not in DATASETS:
        def load(root, image_size, n=rows * 2):  # half carved out as val and test
            rng = np.random.default_rng(0)
            return Raw(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), rng.integers(0, num_classes, n),
                       None, None, num_classes, ViewPolicy(pad=1, flip=False))

        DATASETS.register(name)(load)
    specs = []
    for i in range(teachers):
        path = os.path.join(out_dir, f"random-t{i}.safetensors")
        import torch

        torch.manual_seed(i)
        save_state_dict(build_model("cnn4", num_classes, 1).state_dict(), path)
        specs.append(f"{{name: t{i}, arch: cnn4, checkpoint: {path}}}")
    base = [f"run.out_dir={out_dir}", "run.device=cpu", f"data.name={name}", "data.val_fraction=0.25",
            "data.test_fraction=0.25", f"teachers.models=[{', '.join(specs)}]", "cache.views=1"]
    run_teachers(load_config(None, base))
    variants = {"full fp16 logits": ["cache.logits=true"],
                f"per-teacher top-{k}": ["cache.logits=false", f"cache.topk={{k: {k}, of: teachers}}"],
                f"ensemble top-{k}": ["cache.logits=false", f"cache.topk={{k: {k}, of: ensemble}}"]}
    out = {}
    for label, changes in variants.items():
        uri = os.path.join(out_dir, "cache-" + label.replace(" ", "-"))
        build_cache(load_config(None, [*base, f"cache.uri={uri}", *changes]))
        per_col = target_bytes(uri)
        out[label] = {"columns": per_col, "bytes_per_view_row": round(sum(per_col.values()), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench_speed.yaml")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["kd", "dkd"])
    ap.add_argument("--out", default="bench/results/topk.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/topk.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    from raykd.pipeline.cache import build_cache, cache_uri
    from raykd.pipeline.core.config import load_config, variant
    from raykd.pipeline.stages.students import run_students
    from raykd.pipeline.stages.teachers import run_teachers

    t0 = time.time()
    cfg = load_config(args.config, [*args.overrides, "cache.layers={}"])
    run_teachers(cfg)
    caches = {"full logits": {}, f"top-{args.k} only": {"cache.logits": False, "cache.topk": {"k": args.k}}}
    rows = {}
    for label, changes in caches.items():
        uri = cache_uri(cfg) + "-" + ("full" if not changes else f"top{args.k}")
        c = variant(cfg, {**changes, "cache.uri": uri}, label)
        manifest = build_cache(c)
        students = [variant(c, {"method.name": m, "distill.student.seed": s,
                                "distill.name": f"topk-{'full' if not changes else args.k}-{m}-s{s}"}, label)
                    for m in args.methods for s in args.seeds]
        recs = run_students(students, c.run.parallel)
        for m in args.methods:
            accs = [r["test_acc"] for r in recs if r["method"] == m]
            rows.setdefault(m, {})[label] = {"test_acc_mean": round(statistics.mean(accs), 5),
                                             "test_acc_std": round(statistics.stdev(accs), 5) if len(accs) > 1 else 0.0,
                                             "per_seed": accs}
        rows.setdefault("bytes_per_view_row", {})[label] = {
            "targets": round(sum(target_bytes(uri).values()), 1), "columns": target_bytes(uri),
            "whole_row": round(manifest["bytes"] / manifest["rows"], 1)}
    scratch = os.path.join(os.path.abspath(cfg.run.out_dir), "topk-1000-classes")
    os.makedirs(scratch, exist_ok=True)
    res = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
           "dataset": cfg.data.name, "train_samples": manifest["dataset"]["train_samples"], "views": manifest["views"],
           "k": args.k, "seeds": args.seeds, "student": cfg.distill.student.arch, "epochs": cfg.distill.optim.epochs,
           "teachers": [t["name"] for t in manifest["teachers"]], "results": rows,
           "classes_1000": class_bytes(scratch), "minutes": round((time.time() - t0) / 60, 1)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| method | full logits | top-{args.k} only |\n|---|---|---|")
    for m in args.methods:
        r = rows[m]
        print(f"| {m} | " + " | ".join(f"{100 * r[lb]['test_acc_mean']:.2f} ± {100 * r[lb]['test_acc_std']:.2f}"
                                     for lb in caches) + " |")
    print("\nbytes per view row (targets):", {lb: v["targets"] for lb, v in rows["bytes_per_view_row"].items()})
    print("1,000 classes, 3 teachers:", {lb: v["bytes_per_view_row"] for lb, v in res["classes_1000"].items()})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
