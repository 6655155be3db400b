"""`raykd cache` against the floor: a bare `inference_mode` loop running the same teachers over the same rows.

    python bench/cache_build.py -c configs/bench_speed.yaml --views 8 --teachers resnet20 --batch 512 \
        --pairs 3 [key=value ...]

Both sides are whole processes of the same Python, timed by this script in turn (bare, raykd, bare,
raykd, ...; this machine is noisy, so each pair gives its own ratio). Both load the data set and the
teachers' checkpoints, render the same K views of every training sample (`raykd.pipeline.data.views`), normalise
them and run every teacher once per view, in batches of `--batch`, on the threads torch takes by default
(all the cores). The bare loop keeps nothing. The raykd side is `raykd cache --overwrite` into a
temporary folder: Parquet files, sha256 of every part, commit records, manifest, and whichever engine
`cache.engine` picks (`auto` = the in-process one on one machine; pass cache.engine=ray for Ray Data's).
Two ratios per pair: whole command (bare process wall / raykd process wall) and in-process (the bare
loop's seconds / the build's own `build_seconds` from its manifest: model loading, passes, commits).
Each pair also runs the bare loop a second time with the malloc settings raykd's teacher forward makes
(`retain_freed_memory`: freed activations stay in the heap instead of being faulted in again every
batch), and gives both ratios against that stricter floor too (`..._vs_retained`): what raykd gains
from the setting that any loop could make. Every side's minor page faults are recorded (`page_faults`).
The teachers must exist (they are trained first if not). Writes --out and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def bare(config: str, overrides: list[str], retain: bool = False) -> None:
    """The floor, in this process: prints {"loop_s", "rows"} as JSON on its last line. `retain`: with the
    malloc settings raykd's teacher forward sets (`retain_freed_memory`), the stricter floor."""
    import torch

    if retain:
        from raykd.pipeline.cache.passes import retain_freed_memory

        assert retain_freed_memory(), "glibc's mallopt is not available here"

    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.datasets import normalize
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.data.views import make_views
    from raykd.pipeline.stages.teachers import load_teacher

    cfg = load_config(config, overrides)
    splits = load_splits(cfg.data)
    names = cfg.cache.teachers or [t.name for t in cfg.teachers.models]
    teachers = {n: load_teacher(os.path.abspath(cfg.run.out_dir), n)[0].eval() for n in names}
    b, n = cfg.cache.batch_size, len(splits.train)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(cfg.cache.views):
            for s in range(0, n, b):
                pixels, _ = make_views(splits.train.images[s:s + b], splits.train.ids[s:s + b], k, cfg.data.seed,
                                       splits.policy)
                x = normalize(torch.from_numpy(pixels), splits.mean, splits.std)
                for name, model in teachers.items():
                    logits, stages = model.forward_stages(x)
                    logits.half()
                    for layer in cfg.cache.layers.get(name, []):
                        stages[layer].half()
    print(json.dumps({"loop_s": time.perf_counter() - t0, "rows": n * cfg.cache.views}))


def faulted(argv: list[str]) -> tuple[float, str, int]:
    """`timed`, and the minor page faults the process took (getrusage of the waited-for children)."""
    import resource

    f0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    wall, out = timed(argv)
    return wall, out, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - f0


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"[bench] {' '.join(argv[:5])} ... failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return wall, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench_speed.yaml")
    ap.add_argument("--views", type=int, default=8, help="K views per training sample (both sides)")
    ap.add_argument("--teachers", nargs="+", help="the cached teachers (default: the config's)")
    ap.add_argument("--batch", type=int, default=512, help="inference batch (both sides)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cache_build.json")
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # one bare side, in this process
    ap.add_argument("--retain", action="store_true", help=argparse.SUPPRESS)  # that bare side with raykd's malloc settings
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    over = [*args.overrides, f"cache.views={args.views}", f"cache.batch_size={args.batch}", "run.device=cpu"]
    if args.teachers:
        over.append(f"cache.teachers=[{', '.join(args.teachers)}]")
    if args.bare:
        return bare(args.config, over, args.retain)
    cmd = "python bench/cache_build.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    import torch

    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.teachers import run_teachers

    cfg = load_config(args.config, over)
    run_teachers(cfg)  # reused when already trained
    pairs = []
    with tempfile.TemporaryDirectory(prefix="raykd-bench-") as tmp:
        for i in range(args.pairs):
            bare_side = [sys.executable, os.path.join(HERE, "cache_build.py"), "--bare", "-c", args.config, *over]
            b_wall, b_out, b_faults = faulted(bare_side)
            floor = json.loads(b_out.strip().splitlines()[-1])
            s_wall, s_out, s_faults = faulted([*bare_side, "--retain"])
            strict = json.loads(s_out.strip().splitlines()[-1])
            uri = os.path.join(tmp, "cache")
            r_wall, _, r_faults = faulted([sys.executable, "-m", "raykd", "cache", "-c", args.config, "--overwrite", *over,
                                           f"cache.uri={uri}"])
            with open(os.path.join(uri, "manifest.json")) as f:
                manifest = json.load(f)
            pair = {"bare_wall_s": round(b_wall, 2), "bare_loop_s": round(floor["loop_s"], 2),
                    "raykd_wall_s": round(r_wall, 2), "raykd_build_s": manifest["build_seconds"],
                    "whole_ratio": round(b_wall / r_wall, 3), "in_process_ratio": round(floor["loop_s"] / manifest["build_seconds"], 3),
                    "retained_bare_wall_s": round(s_wall, 2), "retained_bare_loop_s": round(strict["loop_s"], 2),
                    "whole_ratio_vs_retained": round(s_wall / r_wall, 3),
                    "in_process_ratio_vs_retained": round(strict["loop_s"] / manifest["build_seconds"], 3),
                    "page_faults": {"bare": b_faults, "retained_bare": s_faults, "raykd": r_faults}}
            pairs.append(pair)
            print(f"[bench] pair {i + 1}/{args.pairs}: {pair}", flush=True)
    rows = floor["rows"]
    med = {k: round(statistics.median(p[k] for p in pairs), 3) for k in pairs[0] if k != "page_faults"}
    import ray

    res = {
        "command": cmd, "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}",
        "dataset": cfg.data.name, "train_samples": rows // args.views, "views": args.views, "rows": rows,
        "teachers": {t.name: t.arch for t in cfg.teachers.models if t.name in (cfg.cache.teachers or [t.name])},
        "batch_size": args.batch, "engine": cfg.cache.engine, "pairs": pairs, "median": med,
        "bare_rows_per_s": round(rows / med["bare_loop_s"], 1), "raykd_rows_per_s": round(rows / med["raykd_build_s"], 1),
        "targets": {"whole_ratio": 0.9, "in_process_ratio": 0.95},
        "retained_bare_rows_per_s": round(rows / med["retained_bare_loop_s"], 1),
        "cache_bytes": manifest["bytes"], "bytes_per_row": round(manifest["bytes"] / manifest["rows"], 1),
        "columns": manifest["columns"],
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(res, f, indent=2)
    print(f"\n| side | whole command s | build / loop s | rows/s |\n|---|---|---|---|\n"
          f"| bare inference_mode loop | {med['bare_wall_s']:.1f} | {med['bare_loop_s']:.1f} | {res['bare_rows_per_s']:,.0f} |\n"
          f"| bare loop, raykd's malloc settings | {med['retained_bare_wall_s']:.1f} | {med['retained_bare_loop_s']:.1f} | {res['retained_bare_rows_per_s']:,.0f} |\n"
          f"| raykd cache | {med['raykd_wall_s']:.1f} | {med['raykd_build_s']:.1f} | {res['raykd_rows_per_s']:,.0f} |\n\n"
          f"median of {args.pairs} pairs: whole-command ratio {med['whole_ratio']:.3f} (target >= 0.9), in-process "
          f"{med['in_process_ratio']:.3f} (target >= 0.95); against the loop with the same malloc settings "
          f"{med['whole_ratio_vs_retained']:.3f} and {med['in_process_ratio_vs_retained']:.3f}; "
          f"{res['bytes_per_row']:.0f} B per row\nwritten {args.out}")


if __name__ == "__main__":
    main()
