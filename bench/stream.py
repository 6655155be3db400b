"""Streamed image folders and shards: memory that stays flat as the set grows 10x, and speed against bare loops.

    python bench/stream.py [--sizes 2000 20000] [--image-size 64] [--rounds 3] [--out bench/results/stream.json]
    python bench/stream.py --source webdataset --out bench/results/stream_webdataset.json   # or --source parquet

Makes image folders of N JPEGs from Fashion-MNIST training images (upscaled 28 -> 64 px; test/ is the
same 1,000 test images for every N), then for each N, in a fresh process, runs the FKD-style pipeline on
the streamed folder: a torchvision ResNet-18 teacher given as a checkpoint (random weights, saved once:
this measures memory and speed, not accuracy) is evaluated, cached over K=1 random_resized_crop views
(records + logits, Ray Data decoding the files), and a cnn16 student trains one epoch from the records
(each crop decoded and replayed in the training loop). A thread samples the RSS of the driver and of every
Ray worker process (the driver's descendants named ray::*) every 0.2 s, and each worker's private memory
outside Ray's object store; the peaks are reported. Every size runs `--rounds` times (sizes in turn, a
fresh process each); the growth and the ratios are taken from the medians over the rounds.

`--source webdataset` / `parquet` runs the same pipeline on the folder written as shards
(`write_tar_shards`, 1,000 samples a shard; `write_parquet_shards`, 1,000 rows a file in row groups of 16):
the memory as the shard set grows; the floor is timed for the folder only.

At the largest N (folder only) it also times the floor, each side by side with raykd's own phase in the same process:
- cache build vs torchvision's ImageFolder + DataLoader (RandomResizedCrop, 2 loader workers) + the
  teacher's forward under no_grad;
- a student epoch vs ImageFolder + DataLoader (RandomResizedCrop + flip) + the student's CE step (the
  faster of 0 and 2 loader workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "runs", "bench-stream")


def make_folder(n: int, size: int, test_n: int = 1000) -> str:
    """<WORK>/folder-<n>/{train,val}/<class>/<id>.jpg from Fashion-MNIST (made once)."""
    from PIL import Image

    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits

    root = os.path.join(WORK, f"folder-{n}-{size}px")
    if os.path.isfile(os.path.join(root, ".done")):
        return root
    s = load_splits(DataSection(name="fashion-mnist", val_fraction=0.01))
    for split, images, labels, count in (("train", s.train.images, s.train.labels, n),
                                         ("val", s.test.images, s.test.labels, test_n)):
        for i in range(count):
            d = os.path.join(root, split, f"c{labels[i]}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(images[i][..., 0]).resize((size, size), Image.BICUBIC).save(
                os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(os.path.join(root, ".done"), "w").close()
    return root


def make_shards(folder: str, source: str) -> str:
    """The folder as `source` shards beside it (made once)."""
    from raykd.pipeline.data.shards import write_parquet_shards, write_tar_shards

    out = f"{folder}-{source}"
    if not os.path.isfile(os.path.join(out, ".done")):
        if source == "webdataset":
            write_tar_shards(folder, out, per_shard=1000)
        else:
            write_parquet_shards(folder, out, per_file=1000, group=16)
        open(os.path.join(out, ".done"), "w").close()
    return out


class RssSampler(threading.Thread):
    """Peak RSS of this process and of each of its descendants whose command line starts with ray::, and
    each worker's peak private memory outside Ray's object store: RSS (and USS) also count the pages of
    the shared object store (/dev/shm) a worker has written, which belong to the store, whose size Ray
    bounds (`ray.object_store_mb`), not to the worker. Reading a worker's page map costs CPU, so it is read
    once a second (RSS every 0.2 s), and the sampler keeps sampling, without recording, while the floor
    runs: both sides of a ratio pay for it alike."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.me, self.every, self.stop, self.record = psutil.Process(), every, threading.Event(), True
        self.driver, self.workers, self.private, self.names = 0, {}, {}, {}
        self.timeline, self.t0 = [], time.perf_counter()  # (seconds, largest worker private MB) every ~2 s

    def run(self):
        import psutil

        last_maps = 0.0
        while not self.stop.is_set():
            now = time.perf_counter() - self.t0
            maps, rec = now - last_maps >= 1.0, self.record
            last_maps = now if maps else last_maps
            driver = self.me.memory_info().rss  # read either way: the sampler costs the same on both sides
            if rec:
                self.driver = max(self.driver, driver)
            for p in self.me.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        rss = p.memory_info().rss
                        own = sum(m.private_clean + m.private_dirty for m in p.memory_maps(grouped=True)
                                  if not m.path.startswith("/dev/shm") and "plasma" not in m.path) if maps else 0
                        if rec:
                            self.workers[p.pid] = max(self.workers.get(p.pid, 0), rss)
                            self.private[p.pid] = max(self.private.get(p.pid, 0), own)
                            if not p.cmdline()[0].startswith("ray::IDLE"):
                                self.names[p.pid] = p.cmdline()[0]
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    pass
            if rec and self.private and (not self.timeline or now - self.timeline[-1][0] >= 2):
                self.timeline.append((round(now, 1), round(max(self.private.values()) / 2**20)))
            self.stop.wait(self.every)


def child(args) -> dict:
    """One pipeline run on folder N (this process is the driver)."""
    import torch

    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.core.config import load_config, variant
    from raykd.pipeline.harness.raysetup import init_ray
    from raykd.pipeline.models.checkpoints import save_state_dict
    from raykd.pipeline.models.zoo import build_model
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    root = make_folder(args.n, args.image_size)
    if args.source != "imagefolder":
        root = make_shards(root, args.source)
    ckpt = os.path.join(WORK, "resnet18-random.safetensors")
    if not os.path.isfile(ckpt):
        torch.manual_seed(0)
        save_state_dict(build_model("torchvision:resnet18", 10, 3).state_dict(), ckpt)
    out = os.path.join(WORK, f"run-{args.n}" + ("" if args.source == "imagefolder" else f"-{args.source}"))
    cfg = load_config(None, [
        f"run.out_dir={out}", "run.device=cpu", f"data.name={args.source}", f"data.root={root}",
        f"data.image_size={args.image_size}", "data.val_fraction=0.05", "data.view_policy=random_resized_crop",
        "data.flip=true", f"teachers.models=[{{name: r18, arch: 'torchvision:resnet18', checkpoint: {ckpt}}}]",
        "cache.views=1", "cache.batch_size=256", "distill.student={arch: cnn16}", "distill.optim.epochs=1",
        "distill.optim.batch_size=128", "method.name=kd", *args.overrides])
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    run_teachers(cfg)
    teachers_s = time.perf_counter() - t0
    init_ray(cfg)
    t0 = time.perf_counter()
    m = build_cache(cfg, overwrite=True)
    cache_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = run_distill(variant(cfg, {"distill.name": f"round{args.round}"}, "stream bench round"))
    distill_s = time.perf_counter() - t0
    sampler.record = False  # still sampling (its cost on both sides), no longer recording
    res = {"n": args.n, "rows": m["rows"], "store_views": m["store_views"], "cache_bytes": m["bytes"],
           "driver_peak_rss_mb": round(sampler.driver / 2**20, 1),
           "worker_peak_rss_mb": round(max(sampler.workers.values(), default=0) / 2**20, 1),
           "worker_peak_private_mb": round(max(sampler.private.values(), default=0) / 2**20, 1),
           "largest_worker": sampler.names.get(max(sampler.workers, key=sampler.workers.get, default=None), "?"),
           "workers_seen": len(sampler.workers), "worker_private_timeline": sampler.timeline,
           "teachers_s": round(teachers_s, 2), "cache_s": round(cache_s, 2), "distill_s": round(distill_s, 2),
           "student_epoch_s": rec["epoch_time_s"]}
    if args.floor:  # the floor's memory is not raykd's: not recorded
        res["floor"] = floor(cfg, root, ckpt, args.image_size, res)
    sampler.stop.set()
    sampler.join()
    return res


def floor(cfg, root: str, ckpt: str, size: int, res: dict) -> dict:
    """Bare torchvision loops for the same work, timed here (right after raykd's round, same process, same
    data), and their ratios to that round's."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.transforms import v2

    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.models.checkpoints import load_foreign, load_state_dict
    from raykd.pipeline.models.zoo import build_model

    splits = load_splits(cfg.data)
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(splits.mean, splits.std)]
    teacher = build_model("torchvision:resnet18", 10, 3)
    load_foreign(teacher, load_state_dict(ckpt), ckpt, "torchvision:resnet18")
    teacher.eval()
    torch.set_num_threads(os.cpu_count() or 1)
    # the same training images raykd cached (its train split: the folder minus the val share)
    ds = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=v2.Compose(
        [v2.Resize(size), v2.CenterCrop(size), v2.RandomResizedCrop(size), *norm]))
    keep = torch.utils.data.Subset(ds, splits.train.ids.tolist())
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(keep, batch_size=256, num_workers=2):
            teacher(x).half()
    t_cache = time.perf_counter() - t0

    ds_s = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=v2.Compose(
        [v2.Resize(size), v2.CenterCrop(size), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *norm]))
    keep_s = torch.utils.data.Subset(ds_s, splits.train.ids.tolist())
    epochs = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        student = build_model("cnn16", 10, 3)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        t0 = time.perf_counter()
        for x, y in torch.utils.data.DataLoader(keep_s, batch_size=128, shuffle=True, num_workers=workers):
            loss = F.cross_entropy(student(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs[workers] = time.perf_counter() - t0
    best = min(epochs.values())
    return {"cache_bare_s": round(t_cache, 2), "cache_throughput_ratio": round(t_cache / res["cache_s"], 3),
            "student_epoch_bare_s": {str(k): round(v, 2) for k, v in epochs.items()},
            "student_epoch_ratio": round(res["student_epoch_s"] / best, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--source", choices=["imagefolder", "webdataset", "parquet"], default="imagefolder",
                    help="the folder itself, or written as tar or Parquet shards")
    ap.add_argument("--out", default="bench/results/stream.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help="every size this many times, each run in a fresh process, "
                    "sizes in turn; peaks and ratios are the medians over the rounds")
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    cmd = "python bench/stream.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runs = []
    for r in range(args.rounds):  # the sizes in turn, so the machine's drift reaches both alike
        for n in args.sizes:
            make_folder(n, args.image_size)
            argv = [sys.executable, __file__, "--child", "--n", str(n), "--image-size", str(args.image_size),
                    "--round", str(r), "--source", args.source, *args.overrides] + \
                (["--floor"] if n == max(args.sizes) and args.source == "imagefolder" else [])
            print(f"[bench] round {r}, streamed {args.source} of {n} images: {' '.join(argv[1:])}", flush=True)
            p = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                sys.exit(f"[bench] round {r} on {n} images failed (exit {p.returncode})")
            runs.append({"round": r, **json.loads(line[7:])})
            print(f"[bench] {n}: {runs[-1]}", flush=True)

    def med(n, key, sub=None):
        return statistics.median((x[sub] if sub else x)[key] for x in runs if x["n"] == n)

    small, big = min(args.sizes), max(args.sizes)
    peaks = {n: {k: med(n, k) for k in ("driver_peak_rss_mb", "worker_peak_rss_mb", "worker_peak_private_mb")}
             for n in (small, big)}
    res = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
           "image_size": args.image_size, "rounds": args.rounds, "runs": runs, "median_peaks_mb": peaks,
           **{f"{k.replace('_peak', '').replace('_mb', '')}_growth": round(peaks[big][k] / peaks[small][k] - 1, 3)
              for k in peaks[big]},
           "source": args.source, "rss_target": 0.15}
    if args.source == "imagefolder":
        res.update({"cache_throughput_ratio": round(med(big, "cache_throughput_ratio", "floor"), 3), "cache_target": 0.85,
                    "student_epoch_ratio": round(med(big, "student_epoch_ratio", "floor"), 3), "student_epoch_target": 1.15})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
