"""Tables and plots from bench/results/<profile>/*.json; `--readme` also rewrites the README's section.

    python bench/report.py [--profile full|quick] [--readme]

Writes bench/results/<profile>/report.md, accuracy.png (test accuracy per method, mean ± std over
seeds), epoch_time.png (CE / cached KD / online KD) and accuracy_vs_epoch.png (mean val accuracy per
epoch). Every target of the benchmark issue is reported as met or missed, with the margin.
"""

from __future__ import annotations

import argparse
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = {
    "ce": "CE (no teacher)", "kd_best": "KD, best single teacher", "kd": "KD, 3-teacher ensemble",
    "kd_online": "KD, teachers online", "dkd": "DKD", "aekt": "AEKT", "skd": "SKD",
    "professor_kd": "professor + KD (`targets: both`)", "pfeed": "pFEED (3 teachers)",
    "sfeed": "sFEED (2 generations)", "imf": "IMF (full student)",
}


def _load(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, f"{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def _pm(m: float, s: float | None) -> str:
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def accuracy_rows(acc: dict) -> list[tuple[str, dict]]:
    """(label, row) for the table: every method, sFEED's generations and IMF's exported model."""
    rows = []
    for m, r in acc["methods"].items():
        label = NAMES.get(m, m) + (f" ({r['teacher']})" if m == "kd_best" else "")
        if "generations" in r:
            for g, gr in enumerate(r["generations"][:-1], 1):
                rows.append((f"{NAMES.get(m, m)}, generation {g}", {**r, **gr, "train_time_s": None}))
            label = f"{NAMES.get(m, m)}, generation {len(r['generations'])}"
        rows.append((label, r))
        if "inference" in r:
            inf = {k: v for k, v in r.items() if not k.startswith("val_acc")}
            rows.append(("IMF, exported inference model", {**inf, **r["inference"], "train_time_s": None}))
    return rows


def targets(acc, speed, build, sweep) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the benchmark issue."""
    out = []
    if acc:
        ms = acc["methods"]
        ce = ms["ce"]["test_acc_mean"]
        below = {m: r["test_acc_mean"] - ce for m, r in ms.items() if m != "ce" and r["test_acc_mean"] < ce}
        out.append(("every method's mean ≥ CE's", "all ≥ CE" if not below else "below CE: " + ", ".join(
            f"{NAMES.get(m, m)} {100 * d:+.2f} pp" for m, d in below.items()), not below))
        if "kd" in ms and "kd_best" in ms:
            d = ms["kd"]["test_acc_mean"] - ms["kd_best"]["test_acc_mean"]
            out.append(("ensemble KD ≥ best single-teacher KD", f"{100 * d:+.2f} pp", d >= 0))
        if "kd" in ms and "kd_online" in ms:
            d = ms["kd"]["test_acc_mean"] - ms["kd_online"]["test_acc_mean"]
            out.append(("cached KD = online KD within 0.3 pp", f"{100 * d:+.2f} pp", abs(d) <= 0.003))
    if speed:
        out.append(("cached-KD / CE epoch time ≤ 1.05", f"{speed['kd_cached_over_ce']:.3f}",
                    speed["kd_cached_over_ce"] <= 1.05))
    if build:
        out.append(("cache build ≥ 0.85 of bare forward", f"{build['throughput_ratio']:.3f}",
                    build["throughput_ratio"] >= 0.85))
    if sweep:
        out.append(("sweep (cache + cached trials) / online ≤ 0.45", f"{sweep['ratio']:.3f}", sweep["ratio"] <= 0.45))
    return out


def markdown(profile: str, acc, speed, build, sweep, suite) -> str:
    folder = f"bench/results/{profile}"
    lines = []
    if suite:
        lines.append(f"`{suite['command']}` ({suite['date']}, {suite['minutes']:.0f} min on this 2-core machine); "
                     f"every JSON, the plots and this text are in `{folder}/`"
                     + (f" ({suite['note']})" if suite.get("note") else "") + ".\n")
    if acc:
        t = acc["teachers"]
        c = acc["cache"]
        spread = "one seed" if len(acc["seeds"]) == 1 else f"mean ± std, {len(acc['seeds'])} seeds"
        lines += [
            f"**Accuracy per method** — {acc['dataset']}, {acc['train_samples']:,} training images (seeded subset), "
            f"teachers " + ", ".join(f"{n} {100 * v['test_acc']:.1f} %" for n, v in t.items())
            + f" test; K={acc['views']} cached views; student {acc['student']}, {acc['epochs']} epochs, batch "
            f"{acc['batch_size']}; seeds {', '.join(map(str, acc['seeds']))} (initialisation and shuffling; one cache);"
            f" students {acc.get('parallel') or 'as many as fit'} at a time, so train time is per student on shared cores.",
            "",
            f"| method | test acc ({spread}) "
            "| val acc | deployed params | train time |",
            "|---|---|---|---|---|",
        ]
        one = len(acc["seeds"]) == 1  # no spread to show
        for label, r in accuracy_rows(acc):
            tt = f"{r['train_time_s']:.0f} s" if r.get("train_time_s") else "—"
            val = _pm(r["val_acc_mean"], None if one else r["val_acc_std"]) if "val_acc_mean" in r else "—"
            test = _pm(r["test_acc_mean"], None if one else r["test_acc_std"])
            lines.append(f"| {label} | {test} | {val} | {r['params']:,} | {tt} |")
        imf = acc["methods"].get("imf", {}).get("inference")
        if imf:
            lines.append(f"\nIMF's exported model: {imf['params']:,} parameters and {imf['flops']:,} FLOPs per image "
                         f"against the full student's {acc['methods']['imf']['params']:,} and {imf['student_flops']:,}.")
        lines.append(
            f"\nCache: {c['bytes'] / 2**20:.1f} MiB, **{c['bytes_per_sample']:,.0f} B per training sample** over the "
            f"K views with the {c['feat_dtype']} feature maps ({', '.join(f'{k}: {v}' for k, v in c['layers'].items())}),"
            f" {c['bytes_per_sample_without_features']:,.0f} B without them; built in {c['build_s']:.0f} s. "
            f"Professor's refined targets: {100 * (acc['professor_refined_acc'] or 0):.1f} % correct on the cached views. "
            f"Times: teachers {acc['time_s']['teachers'] / 60:.1f} min, students {acc['time_s']['students'] / 60:.1f} min.")
        lines.append(f"\n![accuracy per method]({folder}/accuracy.png) ![val accuracy per epoch]({folder}/accuracy_vs_epoch.png)\n")
    if speed:
        rows = speed["modes"]
        ce = rows["ce"]["median_epoch_s"]
        lines += [f"**Epoch time** (`{speed['command']}`): {speed['student']}, one worker (in the command's own process), median over "
                  "every epoch but each run's first.", "", "| mode | median epoch | samples/s | ratio to CE |",
                  "|---|---|---|---|"]
        for mode, label in (("ce", "CE"), ("kd_cached", "KD from the cache"), ("kd_online", "KD, teachers online")):
            r = rows[mode]
            lines.append(f"| {label} | {r['median_epoch_s']:.2f} s | {r['samples_per_s']:,.0f} | {r['median_epoch_s'] / ce:.2f} |")
        lines.append(f"\n![epoch time]({folder}/epoch_time.png)\n")
    if build:
        lines.append(f"**Cache build** (`{build['command']}`): {build['train_samples']:,} samples × {build['views']} views × "
                     f"{len(build['teachers'])} teachers: plain torch loop {build['torch_loop_s']:.1f} s, `raykd cache` "
                     f"{build['cache_build_s']:.1f} s (+ ray.init {build['ray_init_s']:.1f} s): throughput ratio "
                     f"**{build['throughput_ratio']:.3f}**; {build['bytes_per_sample']:,.0f} B per sample without features.\n")
    if sweep:
        lines.append(f"**Sweep** (`{sweep['command']}`): {sweep['cached']['trials']} trials, {sweep['epochs']} epochs: "
                     f"cache build {sweep['cache_build_s']:.0f} s + cached trials = {sweep['cached']['total_s']:.0f} s "
                     f"against {sweep['online']['total_s']:.0f} s with the teachers online: ratio **{sweep['ratio']:.3f}**.\n")
    tg = targets(acc, speed, build, sweep)
    if tg:
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in tg]
    return "\n".join(lines) + "\n"


def plots(folder: str, acc, speed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if acc:
        rows = accuracy_rows(acc)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        y = range(len(rows))
        ax.barh(y, [100 * r["test_acc_mean"] for _, r in rows], xerr=[100 * r["test_acc_std"] for _, r in rows],
                color="tab:blue", alpha=0.8, capsize=3)
        ax.axvline(100 * acc["methods"]["ce"]["test_acc_mean"], color="k", ls="--", lw=1, label="CE")
        ax.set_yticks(list(y), [label.replace("`", "") for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        lo = min(100 * r["test_acc_mean"] - 100 * r["test_acc_std"] for _, r in rows)
        ax.set_xlim(lo - 1, None)
        ax.set_xlabel(f"test accuracy % (mean ± std over {len(acc['seeds'])} seeds)")
        ax.set_title(f"{acc['dataset']}, {acc['train_samples']:,} train images, {acc['student']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "accuracy.png"), dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, r in acc["methods"].items():
            ax.plot(range(1, len(r["val_curve"]) + 1), [100 * v for v in r["val_curve"]], marker=".",
                    label=NAMES.get(m, m).replace("`", ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy % (mean over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "accuracy_vs_epoch.png"), dpi=110)
        plt.close(fig)
    if speed:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        modes = [("ce", "CE"), ("kd_cached", "KD cached"), ("kd_online", "KD online")]
        ax.bar([label for _, label in modes], [speed["modes"][m]["median_epoch_s"] for m, _ in modes],
               color=["tab:gray", "tab:blue", "tab:red"])
        ax.set_ylabel("median epoch time, s")
        ax.set_title(f"{speed['dataset']}, {speed['student']}, batch {speed['batch_size']}")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "epoch_time.png"), dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="full")
    ap.add_argument("--readme", action="store_true", help="replace the README's text between the bench markers")
    args = ap.parse_args()
    folder = os.path.join(ROOT, "bench", "results", args.profile)
    res = [_load(folder, n) for n in ("accuracy", "distill_speed", "cache_build", "sweep_speed", "suite")]
    if not any(res[:4]):
        raise SystemExit(f"no results in {folder}: run `python bench/run.py --profile {args.profile}` first")
    plots(folder, res[0], res[1])
    text = markdown(args.profile, *res)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        path = os.path.join(ROOT, "README.md")
        readme = open(path).read()
        pat = re.compile(r"(<!-- bench:start -->\n).*?(<!-- bench:end -->)", re.S)
        if not pat.search(readme):
            raise SystemExit("README.md has no <!-- bench:start --> ... <!-- bench:end --> markers")
        open(path, "w").write(pat.sub(lambda mt: mt.group(1) + text + mt.group(2), readme))
        print("README.md: benchmark section rewritten")


if __name__ == "__main__":
    main()
