"""Students sharing one machine: the wall time of `raykd run`'s students at 1, 2, 3 ... at a time.

    python bench/share.py -c configs/demo.yaml --parallel 1 2 3 --rounds 2 --out bench/results/overhead/share.json

Each setting is one `raykd run` process whose teachers, cache and professor are already there (built
first, not timed) and whose students are new (a fresh `run.seed` per run, so none is reused); the figure
is the time from its "N students" line to its last student's "done" line. By default (`run.parallel`
unset) raykd runs as many students as the cores fit, each with an equal share of the cores as torch
threads; `--parallel P` forces P at a time, with max(1, cores // P) threads each, so P above the cores
oversubscribes them. `--stream` adds each setting once more with the views streamed through Ray Data
(`distill.in_memory=false`), whose read tasks then run beside the students. Settings run in turn, `--rounds`
times, so that the machine's drift spreads over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def students_wall(cfg: str, overrides: list[str]) -> tuple[float, int]:
    args = [os.path.join(os.path.dirname(sys.executable), "raykd"), "run", "-c", cfg, *overrides]
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stamps = [(time.time() - t0, ln.rstrip()) for ln in proc.stdout]
    if proc.wait() != 0:
        sys.exit("raykd run failed:\n" + "\n".join(ln for _, ln in stamps[-30:]))
    start = next((t for t, ln in stamps if ln.startswith("[distill]") and " students, " in ln), None)
    if start is None:  # one student: from its first line
        start = next(t for t, ln in stamps if ln.startswith("[distill]"))
    done = [t for t, ln in stamps if ln.startswith("[distill]") and ": done, val" in ln]
    return round(done[-1] - start, 2), len(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="also each setting with distill.in_memory=false")
    ap.add_argument("--out", default="bench/results/overhead/share.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = "python bench/share.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "raykd"), "run", "-c", args.config, *args.overrides],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # teachers, cache, professor and seed-0 students
    settings = [(p, "memory") for p in args.parallel] + ([(p, "stream") for p in args.parallel] if args.stream else [])
    runs: dict[str, list] = {f"{p} at a time, {mode}": [] for p, mode in settings}
    seed = 1000 + int(time.time()) % 100000
    for r in range(args.rounds):
        for p, mode in settings:
            seed += 1
            wall, n = students_wall(args.config, [*args.overrides, f"run.parallel={p}", f"run.seed={seed}",
                                                  f"distill.in_memory={'true' if mode == 'memory' else 'false'}"])
            runs[f"{p} at a time, {mode}"].append(wall)
            print(f"[share] round {r + 1}: {p} at a time ({mode}): {n} students in {wall:.1f}s", flush=True)
    res = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
           "students": n, "walls_s": runs, "median_s": {k: statistics.median(v) for k, v in runs.items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("\n| students at once | wall of the students (median) |\n|---|---|")
    for k, v in res["median_s"].items():
        print(f"| {k} | {v:.1f} s |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
