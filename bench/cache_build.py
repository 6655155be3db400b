"""Cache build throughput vs a plain torch loop doing the same teacher forwards on the same views.

    python bench/cache_build.py -c configs/fashion_mnist.yaml [--views 2] [key=value ...]

Both sides render the same K views of every training sample (`pipeline.views`), normalise them and run
every teacher once per view with `no_grad`; the torch loop keeps nothing, the Ray side is `raykd cache`
end to end (Ray Data actor pools, fp16 logits, Parquet write, commit records, manifest). Ray's fixed
start-up (`ray.init`) is timed apart. The teachers must exist (`raykd teachers -c ...`); they are
trained first if not. Writes bench/results/cache_build.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_splits, normalize  # noqa: E402
from pipeline.teachers import load_teacher, run_teachers  # noqa: E402
from pipeline.views import make_views  # noqa: E402


def torch_loop(splits, data_seed: int, teachers, views: int, batch_size: int, layers: dict) -> float:
    """Seconds for the bare work: render, normalise, forward every teacher; nothing stored."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(views):
            for s in range(0, len(splits.train), batch_size):
                ids = splits.train.ids[s:s + batch_size]
                pixels, _ = make_views(splits.train.images[s:s + batch_size], ids, k, data_seed, splits.policy)
                x = normalize(torch.from_numpy(pixels), splits.mean, splits.std)
                for name, model in teachers.items():
                    logits, stages = model.forward_stages(x)
                    logits.half()
                    for layer in layers.get(name, []):
                        stages[layer].half()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--views", type=int, default=2, help="K views per training sample (both sides)")
    ap.add_argument("--out", default="bench/results/cache_build.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/cache_build.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    cfg = load_config(args.config, [*args.overrides, f"cache.views={args.views}", "run.device=cpu"])
    run_teachers(cfg)  # reused when already trained
    splits = load_splits(cfg.data)
    names = cfg.cache.teachers or [t.name for t in cfg.teachers.models]
    teachers = {n: load_teacher(os.path.abspath(cfg.run.out_dir), n)[0] for n in names}
    n_views = len(splits.train) * args.views

    print(f"[bench] torch loop: {len(splits.train)} samples x {args.views} views x {len(names)} teachers", flush=True)
    t_torch = torch_loop(splits, cfg.data.seed, teachers, args.views, cfg.cache.batch_size, cfg.cache.layers)
    print(f"[bench] torch loop: {t_torch:.1f}s ({n_views / t_torch:.0f} views/s)", flush=True)

    import ray

    from pipeline.cache import build_cache
    from pipeline.raysetup import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray.data.DataContext.get_current()  # part of start-up: Ray Data's context
    t_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="raykd-bench-") as tmp:
        cfg.cache.uri = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        manifest = build_cache(cfg)
        t_ray = time.perf_counter() - t0
    ray.shutdown()

    ratio = (n_views / t_ray) / (n_views / t_torch)
    res = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}",
        "dataset": cfg.data.name, "train_samples": len(splits.train), "views": args.views,
        "teachers": {n: cfg.teachers.models[[t.name for t in cfg.teachers.models].index(n)].arch for n in names},
        "batch_size": cfg.cache.batch_size, "actors_per_teacher": cfg.cache.actors_per_teacher,
        "torch_loop_s": round(t_torch, 2), "torch_views_per_s": round(n_views / t_torch, 1),
        "ray_init_s": round(t_init, 2), "cache_build_s": round(t_ray, 2), "cache_views_per_s": round(n_views / t_ray, 1),
        "throughput_ratio": round(ratio, 3), "target": 0.85,
        "ratio_including_ray_init": round(t_torch / (t_ray + t_init), 3),
        "cache_bytes": manifest["bytes"], "bytes_per_row": round(manifest["bytes"] / manifest["rows"], 1),
        "bytes_per_sample": round(manifest["bytes"] / len(splits.train), 1),
        "columns": manifest["columns"],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| side | time s | views/s |\n|---|---|---|\n"
          f"| torch loop (forwards only) | {t_torch:.1f} | {n_views / t_torch:.0f} |\n"
          f"| raykd cache (after ray.init {t_init:.1f} s) | {t_ray:.1f} | {n_views / t_ray:.0f} |\n\n"
          f"throughput ratio {ratio:.3f} (target >= 0.85); {res['bytes_per_sample']:.0f} B per sample "
          f"({res['bytes_per_row']:.0f} B per view row)\nwritten {args.out}")


if __name__ == "__main__":
    main()
