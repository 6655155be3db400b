"""The GPU path, measured on a CUDA device in one prepared run (about 5 minutes on one H200; never run in CI).

    python bench/gpu.py --fm-root DIR [--out bench/results/gpu.json] [--device cuda] [--small]

1. A student's epoch from an in-memory cache against a bare CUDA loop on the same data: a resnet20
   teacher (2 epochs) over Fashion-MNIST's 57,000 training images, a K=2 cache (the local engine, on the
   device), then `raykd distill` of a resnet8 student (KD, batch 256, 4 epochs, `distill.device_views:
   auto`, so the views sit on the device) and, in the same process, a bare loop with the same student,
   loss, optimiser, batch size and cached views held on the device (cuDNN autotuning on both sides).
   Ratio: raykd's median epoch over the bare loop's.
2. The render pool against a DataLoader at the same CPU count: `bench/decode.py`'s epoch (2,000 JPEGs of
   400x320 px, random-resized crops to 160 px, a tiny student on the CPU) with raykd's pool of as many
   threads as cores and torchvision's DataLoader with as many workers.

It runs without Ray (a lone job trains in this process, the cache is built by the local engine), so a
machine whose Python lacks Ray can run it: put the repository on PYTHONPATH and carry the wheels of what
else is missing (pydantic). `--small` is a dry run on a few hundred images, for checking the script on
a CPU. Results: one JSON with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def bare_epochs(cfg, epochs: int, device) -> list[float]:
    """The floor: the cached views as device tensors, the same student and loss, a plain loop."""
    import numpy as np
    import torch

    from raykd.methods import MethodContext, Targets, build_method
    from raykd.pipeline.cache import Cache, cache_uri, column_array
    from raykd.pipeline.data.datasets import normalize
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.models.zoo import build_model

    splits = load_splits(cfg.data)
    cache = Cache(cache_uri(cfg))
    teachers = cache.teachers
    views = {}
    for k in range(cache.manifest["views"]):
        t = cache.read_table(["label", "pixels", *[f"logits.{n}" for n in teachers]], views=[k])
        views[k] = (normalize(torch.from_numpy(column_array(t, "pixels")), splits.mean, splits.std).to(device),
                    torch.from_numpy(column_array(t, "label").astype(np.int64)).to(device),
                    {n: torch.from_numpy(column_array(t, f"logits.{n}").astype(np.float32)).to(device) for n in teachers})
    torch.manual_seed(0)
    student = build_model(cfg.distill.student.arch, splits.num_classes, splits.in_chans).to(device)
    method = build_method(cfg.method, MethodContext(num_classes=splits.num_classes, teachers=teachers, epochs=epochs))
    method.to(device)
    o = cfg.distill.optim
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    n, times = len(splits.train), []
    for epoch in range(epochs):
        x_all, y_all, z_all = views[epoch % len(views)]
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device)
        for s in range(0, n, o.batch_size):
            idx = perm[s:s + o.batch_size]
            logits, stages = student.forward_stages(x_all[idx])
            loss = method(logits, stages, Targets(logits={t: z[idx] for t, z in z_all.items()}), y_all[idx], epoch + 1)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fm-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files")
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a dry run on a few hundred images")
    args = ap.parse_args()
    import torch

    from raykd.pipeline.cache import build_cache
    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.stages.distill import student_dir
    from raykd.pipeline.stages.students import run_distill
    from raykd.pipeline.stages.teachers import run_teachers

    if args.device == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    epochs = 2 if args.small else 4
    work = tempfile.mkdtemp(prefix="raykd-gpu-")
    over = [f"run.out_dir={work}", f"run.device={args.device}", "data.name=fashion-mnist", f"data.root={args.fm_root}",
            "data.val_fraction=0.05", "teachers.models=[{name: t, arch: resnet20, seed: 1}]",
            f"teachers.optim.epochs={1 if args.small else 2}", "teachers.optim.batch_size=256", "cache.views=2",
            "cache.batch_size=1024", "method.name=kd", "distill.student.arch=resnet8",
            f"distill.optim.epochs={epochs}", "distill.optim.batch_size=256", "distill.optim.lr=0.1",
            "distill.device_views=auto", "distill.test_every=0"]
    if args.small:
        over += ["data.train_subset=600", "data.test_subset=200"]
    cfg = load_config(None, over)
    res = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
           "device": device_name, "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    t0 = time.perf_counter()
    run_teachers(cfg)
    res["teacher_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    m = build_cache(cfg)
    res["cache_s"], res["cache_rows"] = round(time.perf_counter() - t0, 2), m["rows"]
    rec = run_distill(cfg)
    ms = [json.loads(x) for x in open(os.path.join(student_dir(cfg), "metrics.jsonl"))]
    raykd = [m_["epoch_time_s"] for m_ in ms]
    bare = bare_epochs(cfg, epochs, args.device)
    res["student"] = {"arch": "resnet8", "rows": ms[0]["samples"], "epochs": epochs,
                      "raykd_epoch_s": raykd, "bare_epoch_s": [round(t, 4) for t in bare],
                      "ratio": round(statistics.median(raykd[1:] or raykd) / statistics.median(bare[1:] or bare), 3),
                      "test_acc": rec["test_acc"]}
    print(f"[gpu] student epoch: raykd {raykd}, bare {res['student']['bare_epoch_s']}, ratio "
          f"{res['student']['ratio']} (target <= 1.05)", flush=True)

    import decode

    cores = os.cpu_count() or 1
    root = decode.make_folder(200 if args.small else 2000)
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits

    s = load_splits(DataSection(name="imagefolder", root=root, image_size=160, view_policy="random_resized_crop"))
    pool = decode.raykd_epoch(root, cores)
    loader = decode.loader_epoch(root, cores, list(s.mean), list(s.std))
    res["decode"] = {"images": 200 if args.small else 2000, "cores": cores, "raykd_pool_images_per_s": round(pool, 1),
                     "dataloader_images_per_s": round(loader, 1), "ratio": round(pool / loader, 3)}
    print(f"[gpu] decode: raykd pool {pool:.0f} images/s, DataLoader({cores} workers) {loader:.0f}: ratio "
          f"{pool / loader:.3f} (target >= 0.95)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
