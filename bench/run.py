"""The benchmark suite: `make bench` (full profile, about 30 min on 2 CPU cores) or `make bench-quick`.

    python bench/run.py [--profile full|quick] [--only accuracy cache_build distill_speed sweep_speed]

Runs each benchmark script of bench/ as its own process on Fashion-MNIST with the profile's config and
arguments, writes every result to bench/results/<profile>/<bench>.json, then bench/report.py renders
the tables and plots (bench/results/<profile>/report.md, *.png) and, for the full profile, the
README's benchmark section. A benchmark that fails stops the suite (exit 1); results already written
stay. Rerunning reuses trained teachers, caches and students whose config has not changed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the cache-build and sweep benchmarks build logits-only caches of their own (as in the earlier issues)
BENCHES = ("accuracy", "cache_build", "distill_speed", "sweep_speed")  # in the order they run
NO_FEATURES = {"cache_build": ["cache.layers={}"], "sweep_speed": ["cache.layers={}"]}

PROFILES = {
    # configs/bench.yaml: 8,000 training images, teachers 5 epochs, K=4 with int8 feature maps, cnn8 8 epochs
    "full": {
        "overrides": [],
        "accuracy": ["--seeds", "0", "1", "2"],
        "cache_build": ["--views", "2"],
        "distill_speed": ["--epochs", "3", "--rounds", "2", "--online-epochs", "2"],
        "sweep_speed": ["--views", "2", "--epochs", "2"],
    },
    # 3,000 training images, 3,000 val, 2,000 test, teachers 3 epochs, K=2, students 5 epochs at batch 64
    # with the gradient norm clipped to 10 (at batch 64 AEKT's serialization layer can run away: nan),
    # one seed, every method but the (slow) online KD; no speed benchmark
    "quick": {
        "overrides": ["run.out_dir=runs/bench-quick", "data.train_subset=3000",
                      "data.test_subset=2000", "teachers.optim.epochs=3", "teachers.optim.batch_size=64",
                      "cache.views=2", "distill.optim.epochs=5", "distill.optim.batch_size=64",
                      "distill.optim.grad_clip=10"],
        "accuracy": ["--seeds", "0", "--methods", "ce", "kd_best", "kd", "dkd", "aekt", "skd", "professor_kd",
                     "pfeed", "sfeed", "imf"],
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=list(PROFILES), default="full")
    ap.add_argument("-c", "--config", default="configs/bench.yaml")
    ap.add_argument("--only", nargs="+", choices=BENCHES)
    args = ap.parse_args()
    prof = PROFILES[args.profile]
    out_dir = os.path.join("bench", "results", args.profile)
    os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
    t0 = time.time()
    for bench in BENCHES:
        if bench not in prof or (args.only and bench not in args.only):
            continue
        cmd = [sys.executable, os.path.join("bench", f"{bench}.py"), "-c", args.config, *prof[bench],
               "--out", os.path.join(out_dir, f"{bench}.json"), *prof["overrides"], *NO_FEATURES.get(bench, [])]
        print(f"\n[bench] {args.profile}: {' '.join(cmd[1:])}  ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            sys.exit(f"[bench] {bench} failed; the results written so far are in {out_dir}")
    minutes = round((time.time() - t0) / 60, 1)
    print(f"\n[bench] {args.profile} profile: {minutes} min", flush=True)
    if not args.only:
        with open(os.path.join(ROOT, out_dir, "suite.json"), "w") as f:
            json.dump({"command": "python bench/run.py " + " ".join(sys.argv[1:]), "profile": args.profile,
                       "date": time.strftime("%Y-%m-%d"), "minutes": minutes}, f, indent=2)
    subprocess.run([sys.executable, os.path.join("bench", "report.py"), "--profile", args.profile,
                    *(["--readme"] if args.profile == "full" else [])], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
