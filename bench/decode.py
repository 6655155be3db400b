"""A decode-bound student epoch: raykd's render pool against torchvision's DataLoader, at equal cores.

    python bench/decode.py [--n 2000] [--rounds 3] [--out bench/results/speed/decode.json]

Makes (once) an image folder of N JPEGs of 400x320 px from Fashion-MNIST training images (each
upscaled, grey as RGB; 10 class folders). Both sides then run one epoch of the same tiny student
(`tiny_student`: 8x average pooling, one 3x3 convolution, a linear head, 314 parameters, so decoding
sets the pace) with SGD and cross-entropy, batch 64:
- raykd: the folder as a streamed `imagefolder` source (`data.image_size: 160`,
  `data.view_policy: random_resized_crop`), its views replayed from their records by
  `MemoryEpochs` (decode, crop, resize, flip, normalise), as a student on a cache of crop records
  does, with a render pool of 1 thread and of as many threads as cores;
- the floor: `torchvision.datasets.ImageFolder` + `DataLoader` with RandomResizedCrop(160) + flip +
  normalise, with 0 workers and with as many worker processes as cores.
raykd trains on its training split (the folder's train/ less the seeded 10 % validation share), the
DataLoader on all of train/: rates are per image. Everything runs in this process, the sides in turn
within each round; ratios are images/s over the
DataLoader's with num_workers = cores, per round, and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "runs", "bench-decode")


def make_folder(n: int) -> str:
    import numpy as np
    from PIL import Image

    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits

    root = os.path.join(WORK, f"folder-{n}")
    if os.path.isdir(os.path.join(root, "train")):
        return root
    fm = load_splits(DataSection(name="fashion-mnist", root="/usr/share/datasets/fashion-mnist"))
    for i in range(n):
        img, y = fm.train.images[i][..., 0], int(fm.train.labels[i])
        d = os.path.join(root, "train", f"c{y}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).convert("RGB").resize((400, 320), Image.BILINEAR).save(os.path.join(d, f"{i:05d}.jpg"),
                                                                                    quality=90)
    for y in range(10):  # a small test split: the source wants one
        idx = np.flatnonzero(fm.test.labels == y)[:5]
        d = os.path.join(root, "test", f"c{y}")
        os.makedirs(d, exist_ok=True)
        for i in idx:
            Image.fromarray(fm.test.images[i][..., 0]).convert("RGB").save(os.path.join(d, f"{i:05d}.jpg"))
    return root


def tiny_student(num_classes: int = 10):
    import torch.nn as nn

    return nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def step_fn(model, opt):
    import torch.nn.functional as F

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def raykd_epoch(root: str, workers: int) -> float:
    import numpy as np
    import torch

    from raykd.pipeline.cache.epochs import view_epochs
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits
    splits = load_splits(DataSection(name="imagefolder", root=root, image_size=160, view_policy="random_resized_crop"))
    model = tiny_student(splits.num_classes)
    step = step_fn(model, torch.optim.SGD(model.parameters(), lr=0.01))
    data = view_epochs(splits.train, np.arange(len(splits.train)), 0, splits.policy, splits.mean, splits.std,
                       lambda e: e, 64, True, 0, workers=workers)
    t0, n = time.perf_counter(), 0
    for b in data(0):
        step(b["x"], b["y"])
        n += len(b["y"])
    return n / (time.perf_counter() - t0)


def loader_epoch(root: str, workers: int, mean, std) -> float:
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(160), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = ImageFolder(os.path.join(root, "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=workers,
                                         persistent_workers=False)
    model = tiny_student(10)
    step = step_fn(model, torch.optim.SGD(model.parameters(), lr=0.01))
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        step(x, y)
        n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/speed/decode.json")
    args = ap.parse_args()
    import torch

    cores = os.cpu_count() or 1
    root = make_folder(args.n)
    from raykd.pipeline.core.sections import DataSection
    from raykd.pipeline.data.splits import load_splits

    s = load_splits(DataSection(name="imagefolder", root=root, image_size=160, view_policy="random_resized_crop"))
    mean, std = list(s.mean), list(s.std)
    rounds = []
    for r in range(args.rounds):
        row = {"raykd_pool_1": raykd_epoch(root, 1), f"raykd_pool_{cores}": raykd_epoch(root, cores),
               "dataloader_0": loader_epoch(root, 0, mean, std), f"dataloader_{cores}": loader_epoch(root, cores, mean, std)}
        row = {k: round(v, 1) for k, v in row.items()}
        row["ratio"] = round(row[f"raykd_pool_{cores}"] / row[f"dataloader_{cores}"], 3)
        rounds.append(row)
        print(f"[bench] round {r + 1}/{args.rounds} (images/s): {row}", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    res = {"command": "python bench/decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{cores} CPU cores, torch {torch.__version__}",
           "images": args.n, "jpeg": "400x320", "image_size": 160, "student": "tiny_student (314 parameters)", "batch_size": 64,
           "rounds": rounds, "median": med, "target": {"ratio": 0.95}}
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(res, f, indent=2)
    print(f"median images/s: {med}; raykd's pool of {cores} over DataLoader with {cores} workers: {med['ratio']:.3f} "
          f"(target >= 0.95)\nwritten {args.out}")


if __name__ == "__main__":
    main()
