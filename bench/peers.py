"""raykd beside torchdistill on the same KD: one teacher, N students, each driven as its users drive it.

    python bench/peers.py -c configs/bench_speed.yaml --students 8 --epochs 8 [key=value ...]

The task: configs/bench_speed.yaml's Fashion-MNIST (a seeded 8,000 training images, its validation
split, a seeded 5,000 test images), its resnet20 teacher (trained by raykd first if missing: both sides
load the same weights), a cnn8 student per seed, pad-crop (2 px) + flip, SGD (momentum 0.9, Nesterov,
weight decay 5e-4) at lr 0.05 with a one-cycle schedule stepped per batch, batch 128, KD at tau 4 with
0.1 CE + 0.9 KD, on the same torch threads (all the cores).

- **raykd**: `raykd cache` (K = --epochs views of every sample, resnet20 only, logits only), then one
  `raykd distill` process per student (method kd, student seed s), as a user types them.
- **torchdistill 1.1.5** (PyPI; installed by this script, without its dependencies, which raykd's
  environment has, into bench/.peers): one process per student running a torchdistill config (YAML
  written by this script in torchdistill's own format: datasets through `!import_call`, the
  `DistillationBox` with torchdistill's `KDLoss`, `OneCycleLR` stepped per iteration) with the training
  and evaluation loop of torchdistill's example script `examples/torchvision/image_classification.py`
  (the example is not in the wheel: `torchdistill_student` below is that loop, minus distributed
  training and checkpoint files). Its teacher runs online on every batch, as torchdistill does.

What could not be matched, and is said in the result: the random crops and flips are drawn by
torchvision on one side and by raykd's seeded views on the other (same kind, other draws); torch's
OneCycleLR warms up along a cosine, raykd's linearly; torchdistill's DataLoader runs with
num_workers=0 (the cores are the teacher's and the student's). The students run one after another on
both sides, in turn (raykd s, torchdistill s, ...), so machine noise falls on both; totals for N
students are the cache (raykd) plus the first N students' walls. Test accuracy is the last epoch's
weights on both sides. Writes --out (JSON) and prints a Markdown table.
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
PEERS = os.path.join(HERE, ".peers")
TORCHDISTILL = "torchdistill==1.1.5"
sys.path[:0] = [ROOT, HERE]

from cache_build import timed  # noqa: E402  (bench/cache_build.py: a whole process, timed)
from stats import ci  # noqa: E402  (bench/stats.py)

# ---------------------------------------------------------------------------------------------------------
# what a torchdistill user writes: the data set and model factories its config names, and the loop of its
# example script


def fashion_split(config: str, overrides: list[str], split: str, train: bool):
    """raykd's split of the config as a torch Dataset of (PIL-free) tensors, with torchvision's augmentation on
    the training split: RandomCrop(pad) + RandomHorizontalFlip, then Normalize with the split's mean/std."""
    import numpy as np
    import torch
    from torchvision import transforms

    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.splits import load_splits

    splits = load_splits(load_config(config, overrides).data)
    part = getattr(splits, split)
    size = part.images.shape[1]
    norm = transforms.Normalize(splits.mean, splits.std)
    aug = ([transforms.RandomCrop(size, padding=splits.policy.pad)]
           + ([transforms.RandomHorizontalFlip()] if splits.policy.flip else [])) if train else []
    tf = transforms.Compose([*aug, norm])
    x = torch.from_numpy(np.ascontiguousarray(part.images)).permute(0, 3, 1, 2).float().div_(255)
    y = torch.from_numpy(part.labels.astype(np.int64))

    class Split(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(x[i]), y[i]

    return Split()


def raykd_zoo(arch: str, num_classes: int, in_chans: int, **_):
    """raykd's zoo models, registered into torchdistill's model registry under the key `raykd_zoo`."""
    from raykd.pipeline.models.zoo import build_model

    return build_model(arch, num_classes, in_chans)


def register() -> None:
    from torchdistill.models.registry import register_model

    register_model(key="raykd_zoo")(raykd_zoo)


def torchdistill_student(config_path: str, seed: int, threads: int) -> dict:
    """The example script's main/train/evaluate for one student, on CPU, without files: returns the epochs'
    seconds, validation and test accuracy (the last epoch's weights)."""
    import torch
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies, load_ckpt, set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.datasets.util import build_data_loader
    from torchdistill.models.registry import get_model

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    set_seed(seed)
    config = yaml_util.load_yaml_file(config_path)
    import_dependencies(config.get("dependencies"))
    device = torch.device("cpu")
    dataset_dict = config["datasets"]
    models = {}
    for role in ("teacher_model", "student_model"):
        mc = config["models"][role]
        models[role] = get_model(mc["key"], None, **mc["kwargs"])
        load_ckpt(mc.get("src_ckpt"), model=models[role], strict=True)
    box = get_distillation_box(models["teacher_model"], models["student_model"], dataset_dict, config["train"], device,
                               None, False, 1)

    @torch.inference_mode()
    def evaluate(loader) -> float:
        box.student_model.eval()
        right = n = 0
        for x, y in loader:
            right += (box.student_model(x).argmax(1) == y).sum().item()
            n += len(y)
        return right / n

    epochs, val = [], []
    for epoch in range(box.num_epochs):
        t0 = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        box.student_model.train()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        epochs.append(time.perf_counter() - t0)
        val.append(evaluate(box.val_data_loader))
        box.post_epoch_process()
    test_cfg = config["test"]["test_data_loader"]
    test = evaluate(build_data_loader(dataset_dict[test_cfg["dataset_id"]], test_cfg, False))
    return {"epoch_s": epochs, "val_acc": val[-1], "test_acc": test, "in_process_s": time.perf_counter() - t_start}


def torchdistill_config(path: str, config: str, overrides: list[str], teacher_ckpt: str, arch: dict, classes: int,
                        chans: int, epochs: int, steps: int, o: dict) -> None:
    """A torchdistill config in its own format (cf. its configs/sample/cifar10/kd/*.yaml)."""
    def ds(split, train):
        return (f"!import_call\n    key: 'peers.fashion_split'\n    init:\n      kwargs:\n        config: {config!r}\n"
                f"        overrides: {json.dumps(overrides)}\n        split: '{split}'\n        train: {train}")

    def model(key_arch, ckpt):
        return (f"    key: 'raykd_zoo'\n    kwargs:\n      arch: '{key_arch}'\n      num_classes: {classes}\n"
                f"      in_chans: {chans}\n    src_ckpt: {ckpt}")

    loader = "    kwargs:\n      batch_size: {b}\n      num_workers: 0\n      pin_memory: false\n      drop_last: false"
    text = f"""dependencies:
  - name: 'peers'
datasets:
  fashion/train: {ds('train', True)}
  fashion/val: {ds('val', False)}
  fashion/test: {ds('test', False)}
models:
  teacher_model:
{model(arch['teacher'], repr(teacher_ckpt))}
  student_model:
{model(arch['student'], 'null')}
train:
  log_freq: 1000
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: 'fashion/train'
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
{loader.format(b=o['batch_size'])}
  val_data_loader:
    dataset_id: 'fashion/val'
    sampler: &val_sampler
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
{loader.format(b=512)}
  teacher:
    sequential: []
    frozen_modules: []
    forward_proc: 'forward_batch_only'
    requires_grad: false
  student:
    adaptations:
    sequential: []
    frozen_modules: []
    forward_proc: 'forward_batch_only'
    requires_grad: true
  optimizer:
    key: 'SGD'
    kwargs:
      lr: {o['lr']}
      momentum: {o['momentum']}
      weight_decay: {o['weight_decay']}
      nesterov: {str(o['nesterov']).lower()}
  scheduler:
    key: 'OneCycleLR'
    kwargs:
      max_lr: {o['lr']}
      total_steps: {epochs * steps}
      pct_start: 0.3
      div_factor: 25.0
      final_div_factor: 400.0
      cycle_momentum: false
    scheduling_step: 1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: {o['temperature']}
              alpha: {o['w_kd']}
              reduction: 'batchmean'
          weight: 1.0
test:
  test_data_loader:
    dataset_id: 'fashion/test'
    sampler: *val_sampler
{loader.format(b=512)}
"""
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------------
# the benchmark


def ensure_torchdistill() -> None:
    site = os.path.join(PEERS, "site")
    if not os.path.isdir(os.path.join(site, "torchdistill")):
        print(f"[peers] installing {TORCHDISTILL} into {os.path.relpath(site, ROOT)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, TORCHDISTILL],
                       check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/bench_speed.yaml")
    ap.add_argument("--students", type=int, default=8, help="students (seeds 0..N-1) on each side")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs (= the cache's views)")
    ap.add_argument("--teacher", default="resnet20")
    ap.add_argument("--student", default="cnn8")
    ap.add_argument("--out", default="bench/results/peers.json")
    ap.add_argument("--td-student", nargs=3, metavar=("CONFIG_YAML", "SEED", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.td_student:  # one torchdistill student, in this process
        sys.path.insert(0, os.path.join(PEERS, "site"))
        register()
        print(json.dumps(torchdistill_student(args.td_student[0], int(args.td_student[1]), int(args.td_student[2]))))
        return
    cmd = "python bench/peers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    import math

    import torch

    from raykd.pipeline.core.config import load_config
    from raykd.pipeline.data.splits import load_splits
    from raykd.pipeline.stages.teachers import load_teacher, run_teachers

    ensure_torchdistill()
    threads = torch.get_num_threads()
    student = [f"distill.student.arch={args.student}", "method.name=kd", f"distill.optim.epochs={args.epochs}",
               "distill.optim.batch_size=128", "distill.optim.lr=0.05", "distill.optim.schedule=onecycle"]
    over = [*args.overrides, "run.device=cpu", f"cache.views={args.epochs}", f"cache.teachers=[{args.teacher}]",
            "cache.layers={}", "cache.batch_size=512", *student]
    cfg = load_config(args.config, over)
    run_teachers(cfg)
    splits = load_splits(cfg.data)
    teacher, _ = load_teacher(os.path.abspath(cfg.run.out_dir), args.teacher)
    tarch = next(t.arch for t in cfg.teachers.models if t.name == args.teacher)
    o = {**cfg.distill.optim.model_dump(), **cfg.method.kd.model_dump()}
    steps = math.ceil(len(splits.train) / 128)
    res = {"command": cmd, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} CPU cores, {threads} torch threads, torch {torch.__version__}",
           "task": {"dataset": cfg.data.name, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                    "teacher": tarch, "student": args.student, "epochs": args.epochs, "batch_size": 128, "lr": o["lr"],
                    "temperature": o["temperature"], "w_ce": o["w_ce"], "w_kd": o["w_kd"]},
           "peer": TORCHDISTILL, "raykd": {}, "torchdistill": {}}
    with tempfile.TemporaryDirectory(prefix="raykd-peers-") as tmp:
        # raykd's own run folder (its teachers, reused); a cache and student names of this run's own
        raykd_over = [f"cache.uri={os.path.join(tmp, 'cache')}"]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        ckpt = os.path.join(tmp, "teacher.pt")
        torch.save(teacher.state_dict(), ckpt)
        td_yaml = os.path.join(tmp, "torchdistill.yaml")
        torchdistill_config(td_yaml, args.config, over, ckpt, {"teacher": tarch, "student": args.student},
                            splits.num_classes, splits.in_chans, args.epochs, steps, o)
        raykd = [sys.executable, "-m", "raykd"]
        wall, _ = timed([*raykd, "cache", "-c", args.config, *over, *raykd_over])
        res["raykd"]["cache_s"] = round(wall, 2)
        print(f"[peers] raykd cache: {wall:.1f} s", flush=True)
        rk, td = [], []
        for s in range(args.students):
            name = f"peers-kd-s{s}-{stamp}"
            wall, _ = timed([*raykd, "distill", "-c", args.config, *over, *raykd_over, f"distill.student.seed={s}",
                             f"distill.name={name}"])
            sdir = os.path.join(os.path.abspath(cfg.run.out_dir), "students", name)
            rec = json.load(open(os.path.join(sdir, "student.json")))
            ms = [json.loads(x) for x in open(os.path.join(sdir, "metrics.jsonl"))]
            rk.append({"seed": s, "wall_s": round(wall, 2), "epoch_s": [round(m["epoch_time_s"], 3) for m in ms],
                       "val_acc": ms[-1].get("val_acc"), "test_acc": rec["test_acc"]})
            wall, text = timed([sys.executable, os.path.abspath(__file__), "--td-student", td_yaml, str(s), str(threads)])
            r = json.loads(text.strip().splitlines()[-1])
            td.append({"seed": s, "wall_s": round(wall, 2), "epoch_s": [round(e, 3) for e in r["epoch_s"]],
                       "val_acc": r["val_acc"], "test_acc": r["test_acc"]})
            print(f"[peers] student {s}: raykd {rk[-1]['wall_s']:.1f} s test {rk[-1]['test_acc']:.4f} | torchdistill "
                  f"{td[-1]['wall_s']:.1f} s test {td[-1]['test_acc']:.4f}", flush=True)
    res["raykd"]["students"], res["torchdistill"]["students"] = rk, td
    table = []
    for n in sorted({1, 3, args.students} & set(range(1, args.students + 1))):
        r_total = res["raykd"]["cache_s"] + sum(x["wall_s"] for x in rk[:n])
        t_total = sum(x["wall_s"] for x in td[:n])
        table.append({"students": n, "raykd_total_s": round(r_total, 1), "torchdistill_total_s": round(t_total, 1),
                      "ratio": round(r_total / t_total, 3)})
    res["totals"] = table
    for side, xs in (("raykd", rk), ("torchdistill", td)):
        accs = [x["test_acc"] for x in xs]
        res[side].update({
            "median_epoch_s": round(statistics.median(e for x in xs for e in x["epoch_s"][1:]), 3),
            "median_student_wall_s": round(statistics.median(x["wall_s"] for x in xs), 2),
            "test_acc_mean": round(ci(accs)[0], 4), "test_acc_ci95": round(ci(accs)[2], 4)})
    res["unmatched"] = ["crop/flip draws (torchvision's RNG vs raykd's seeded views)",
                        "OneCycleLR's cosine warm-up vs raykd's linear one",
                        "torchdistill's teacher runs online each batch (its design); raykd's reads the cache"]
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(res, f, indent=2)
    r, t = res["raykd"], res["torchdistill"]
    print(f"\n| | raykd | {TORCHDISTILL} |\n|---|---|---|\n"
          f"| epoch (median) | {r['median_epoch_s']:.2f} s | {t['median_epoch_s']:.2f} s |\n"
          f"| one student's command | {r['median_student_wall_s']:.1f} s | {t['median_student_wall_s']:.1f} s |\n"
          f"| cache (once) | {r['cache_s']:.1f} s | — |\n"
          + "".join(f"| total, {x['students']} student(s) | {x['raykd_total_s']:.1f} s | {x['torchdistill_total_s']:.1f} s "
                    f"(ratio {x['ratio']:.2f}) |\n" for x in table)
          + f"| test accuracy | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_ci95']:.2f} % | "
            f"{100 * t['test_acc_mean']:.2f} ± {100 * t['test_acc_ci95']:.2f} % |\n\nwritten {args.out}")


if __name__ == "__main__":
    main()
