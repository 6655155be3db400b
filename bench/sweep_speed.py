"""Wall time of a sweep: cache build + N cached trials against the same N trials with the teachers online.

    python bench/sweep_speed.py -c configs/fashion_mnist.yaml [--views 2 --epochs 2] [key=value ...]

Both sides are `raykd sweep` (Ray Tune, the same 8-trial grid: lr x method, the same trials at a time)
over the same students, epochs and views. The cached side's time is a fresh `raykd cache` of
`--views` views into a new folder plus the cached sweep; the online side's is the sweep with
`distill.teachers=online` (every trial renders the views and runs the three teachers itself). Trained
teachers are reused by both (training them is outside the comparison). One run, side by side; the
fresh cache is deleted afterwards. Writes bench/results/sweep_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd.pipeline.cache import build_cache  # noqa: E402
from raykd.pipeline.core.config import load_config, variant  # noqa: E402
from raykd.pipeline.harness.raysetup import init_ray  # noqa: E402
from raykd.pipeline.stages.sweep import run_sweep  # noqa: E402
from raykd.pipeline.stages.teachers import run_teachers  # noqa: E402

SPACE = {"distill.optim.lr": {"grid": [0.02, 0.05, 0.1, 0.2]}, "method.name": {"grid": ["kd", "dkd"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--views", type=int, default=2, help="K of the fresh cache")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of every trial")
    ap.add_argument("--out", default="bench/results/sweep_speed.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/sweep_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = load_config(args.config, args.overrides)
    cache = os.path.join(os.path.abspath(base.run.out_dir), f"bench-sweep-cache-{stamp}")
    cfg = variant(base, {"cache.uri": cache, "cache.views": args.views, "distill.optim.epochs": args.epochs,
                         "sweep.space": SPACE, "sweep.search": "grid", "sweep.num_samples": 1}, "bench")
    run_teachers(cfg)
    init_ray(cfg)  # once, outside both timings

    t0 = time.time()
    manifest = build_cache(cfg)
    t_cache = time.time() - t0
    cached = run_sweep(variant(cfg, {"sweep.name": f"bench-cached-{stamp}"}, "bench"))
    t_cached = time.time() - t0
    t1 = time.time()
    online = run_sweep(variant(cfg, {"sweep.name": f"bench-online-{stamp}", "distill.teachers": "online"}, "bench"))
    t_online = time.time() - t1
    shutil.rmtree(cache, ignore_errors=True)

    def side(s: dict) -> dict:
        return {"trials": len(s["rows"]), "sweep_s": s["seconds"], "errors": [r["error"] for r in s["rows"] if r["error"]],
                "teachers_loaded": sorted({r["teachers_loaded"] for r in s["rows"]}),
                "best": s["best"], "best_val_acc": s["best_val_acc"], "best_test_acc": s["best_test_acc"],
                "median_val_acc": statistics.median(r["val_acc"] for r in s["rows"] if r["val_acc"] is not None)}

    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "dataset": cfg.data.name, "train_samples": manifest["dataset"]["train_samples"], "views": args.views,
        "epochs": args.epochs, "student": cfg.distill.student.arch, "space": SPACE,
        "teachers": [t.name for t in cfg.teachers.models],
        "cache_build_s": round(t_cache, 1), "cached": {**side(cached), "total_s": round(t_cached, 1)},
        "online": {**side(online), "total_s": round(t_online, 1)},
        "ratio": round(t_cached / t_online, 3), "target_ratio": 0.45,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("\n| side | wall time | of which cache build | best val acc (its test acc) |\n|---|---|---|---|")
    n = len(cached["rows"])
    for name, t, tc in ((f"cache build + {n} cached trials", t_cached, t_cache), (f"{n} online trials", t_online, 0.0)):
        s = res["cached" if tc else "online"]
        print(f"| {name} | {t:.0f} s | {tc:.0f} s | {100 * s['best_val_acc']:.2f} % ({100 * s['best_test_acc']:.2f} %) |")
    print(f"\nratio {res['ratio']:.3f} (target <= 0.45) -> {args.out}")


if __name__ == "__main__":
    main()
