"""Tables and plots from bench/results/<profile>/*.json; `--readme` also rewrites docs/benchmarks.md's section.

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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stats import paired  # noqa: E402  (bench/stats.py)
ROOT = os.path.dirname(HERE)
NAMES = {
    "ce": "CE (no teacher)", "kd_best": "KD, best single teacher", "kd_aa_cached": "KD, one teacher, cached (A/A)",
    "kd_aa_online": "KD, the same teacher online (A/A)",
    "kd": "KD, teachers' mean probability", "kd_weighted": "KD, weighted by val acc (T = 0.01)",
    "kd_ca_mkd": "KD, CA-MKD weights", "kd_entropy": "KD, entropy weights (EBKD)", "kd_ae_kd": "KD, AE-KD (min-norm)",
    "kd_wce1": "KD with w_ce = 1", "label_mix": "KD on the label mix (q + e_y) / 2",
    "professor_kd": "professor + KD (`targets: both`)", "professor_refined": "KD on the professor's targets",
    "kd_online": "KD, teachers online", "dkd": "DKD", "aekt": "AEKT", "aekt_no_norm": "AEKT, `normalize: false`",
    "skd": "SKD", "pfeed": "pFEED (3 teachers)", "sfeed": "sFEED (2 generations)", "imf": "IMF (full student)",
    "imf_ce": "IMF architecture, CE only (control)", "imf_kd": "IMF architecture, KD at IMF's beta (control)",
    "skd_fixed": "KD, teacher at τ/r, student at τ (SKD's reduction)", "ce_features": "CE on the feature cache",
    "kd_features": "KD on the feature cache",
}
ENSEMBLES = ("kd_ca_mkd", "kd_entropy", "kd_ae_kd")
# rows that are not methods but baselines or controls: the "above CE" target does not apply to them
CONTROLS = ("ce", "imf_ce", "imf_kd", "kd_aa_online", "kd_wce1", "label_mix", "skd_fixed", "ce_features", "kd_features")


def _load(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, f"{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def _pm(m: float, s: float | None) -> str:
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def _d(x: dict | None) -> str:
    return "—" if not x else f"{100 * x['mean']:+.2f} ± {100 * x['ci95']:.2f}"


def probe_of(acc: dict, plateau: dict | None) -> bool:
    """Is `plateau` a probe of this regime? One of other epochs, batch or learning rate says nothing of it."""
    return bool(plateau) and all(plateau.get(f"regime_{k}") == acc[k] for k in ("epochs", "batch_size", "lr") if k in acc)


def converged(acc: dict, plateau: dict | None) -> tuple[str, str, bool | None]:
    """Were the students trained long enough? Under a decaying schedule (one-cycle) the validation curve
    rises until the learning rate reaches 0 whatever the length, so its last epochs cannot tell; the
    probe (bench/plateau.py) trains CE and KD again for twice the epochs with the same seeds and cache:
    met when that moves neither by more than 0.5 points (paired by seed)."""
    target = "students trained long enough (twice the epochs moves CE and KD by ≤ 0.5 pp, paired)"
    if not probe_of(acc, plateau):
        return (target, "no probe of this regime: run `python bench/plateau.py`", None)
    ms = acc["methods"]
    gains = {m: paired(plateau["methods"][m], ms[m]) for m in ("ce", "kd") if m in ms and m in plateau["methods"]}
    measured = ", ".join(f"{NAMES[m]} {_d(d)} pp at {plateau['epochs']} epochs" for m, d in gains.items())
    return (target, measured, all(abs(d["mean"]) <= 0.005 for d in gains.values()))


def accuracy_rows(acc: dict) -> list[tuple[str, dict]]:
    """(label, row) for the table: every method, sFEED's generations and IMF's exported model."""
    rows = []
    for m, r in acc["methods"].items():
        label = NAMES.get(m, m) + (f" ({r['teacher']})" if "teacher" in r else "")
        if "generations" in r:
            for g, gr in enumerate(r["generations"][:-1], 1):
                rows.append((f"{NAMES.get(m, m)}, generation {g}", {**r, **gr, "train_time_s": None}))
            label = f"{NAMES.get(m, m)}, generation {len(r['generations'])}"
        rows.append((label, r))
        if "inference" in r:
            inf = {k: v for k, v in r.items() if not k.startswith("val_acc")}
            rows.append((f"{NAMES.get(m, m).split(' (')[0]}, exported inference model",
                         {**inf, **r["inference"], "train_time_s": None}))
    return rows


def best_by_val(ms: dict, candidates) -> str | None:
    """The candidate row with the best mean validation accuracy (the test set chooses nothing); None when a
    candidate has no validation accuracy recorded."""
    if any("val_acc_mean" not in ms[m] for m in candidates):
        return None
    return max(candidates, key=lambda m: ms[m]["val_acc_mean"])


# each seed method's nearest baselines: the rows that could explain its gain
NEAREST = {
    "dkd": ("kd", "kd_wce1"), "aekt": ("dkd", "kd_wce1"), "skd": ("skd_fixed", "kd"),
    "professor_kd": ("label_mix", "kd"), "pfeed": ("ce_features", "kd_features"), "imf": ("imf_kd", "kd_features"),
    "kd_ae_kd": ("kd", "kd_best"),
}


def verdicts(ms: dict) -> list[tuple[str, str, str]]:
    """(method, verdict, measured) for each seed method with rows for it and its nearest baselines:
    reproduced when its paired 95 % CI lies above 0 against every nearest baseline, partly when against
    some, not reproduced when against none. A row with an exported model (IMF, its controls) is judged by it."""
    out = []
    for m, bases in NEAREST.items():
        if "per_seed" not in ms.get(m, {}):
            continue
        ds = {b: paired(ms[m].get("inference", ms[m]), ms[b].get("inference", ms[b]))
              for b in bases if "per_seed" in ms.get(b, {})}
        ds = {b: d for b, d in ds.items() if d}
        if not ds:
            continue
        above = [b for b, d in ds.items() if d["mean"] - d["ci95"] > 0]
        verdict = "reproduced" if len(above) == len(ds) else "partly" if above else "not reproduced"
        out.append((NAMES.get(m, m), verdict, "; ".join(f"− {NAMES.get(b, b)} {_d(d)} pp" for b, d in ds.items())))
    return out


def method_targets(ms: dict, at: str = "") -> list[tuple[str, str, bool | None]]:
    """The methods' targets on one set of rows (the regime's, or the probe's at twice the epochs: `at`)."""
    out = []
    if "ce" in ms:
        below = {m: paired(r, ms["ce"]) for m, r in ms.items() if m not in CONTROLS and "per_seed" in r}
        below = {m: d for m, d in below.items() if d and d["mean"] - d["ci95"] <= 0}
        out.append((f"every method{' probed' if at else ''} above CE (paired 95 % CI above 0){at}",
                    "all" if not below else "not: " + ", ".join(f"{NAMES.get(m, m)} {_d(d)} pp" for m, d in below.items()),
                    not below))
    ens = [m for m in ENSEMBLES if m in ms]
    if ens and "kd_best" in ms and "kd" in ms:
        best = best_by_val(ms, ens)
        if best is None:
            out.append((f"best per-sample ensemble ≥ KD, best single teacher{at}",
                        "not judged: a row has no validation accuracy to choose by", None))
            return out
        for base in ("kd_best", "kd"):
            d = paired(ms[best], ms[base])
            out.append((f"best per-sample ensemble ({NAMES[best]}) ≥ {NAMES[base]} (paired 95 % CI above 0){at}",
                        f"{_d(d)} pp", d["mean"] - d["ci95"] > 0))
    if "professor_kd" in ms and "label_mix" in ms:
        d = paired(ms["professor_kd"], ms["label_mix"])
        out.append((f"professor + KD > label-mix KD{at}", f"{_d(d)} pp", d["mean"] - d["ci95"] > 0))
    return out


def targets(acc, speed, build, sweep, plateau=None) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the benchmark issues; differences are paired by seed.
    With a probe of this regime that trained more rows than CE and KD, the methods' targets are given
    again at its length."""
    out = []
    if acc:
        ms = acc["methods"]
        out += method_targets(ms)
        if "kd_aa_cached" in ms and "kd_aa_online" in ms:
            d = paired(ms["kd_aa_cached"], ms["kd_aa_online"])
            out.append(("cached KD (K ≥ epochs) = online KD (0 inside the paired 95 % CI)", f"{_d(d)} pp",
                        abs(d["mean"]) <= d["ci95"]))
        if "ce" in ms:
            out.append(converged(acc, plateau))
        if probe_of(acc, plateau) and set(plateau["methods"]) - {"ce", "kd"}:
            out += method_targets(plateau["methods"], f", at {plateau['epochs']} epochs")
    if speed:
        out.append(("cached-KD / CE epoch time ≤ 1.05", f"{speed['kd_cached_over_ce']:.3f}",
                    speed["kd_cached_over_ce"] <= 1.05))
    if build:
        out.append(("cache build ≥ 0.85 of bare forward", f"{build['throughput_ratio']:.3f}",
                    build["throughput_ratio"] >= 0.85))
    if sweep:
        out.append(("sweep (cache + cached trials) / online ≤ 0.45", f"{sweep['ratio']:.3f}", sweep["ratio"] <= 0.45))
    return out


def baseline_pairs(ms: dict) -> str:
    """A method minus the baseline that could explain its gain, for every such pair in the rows `ms`."""
    pairs = [(a, b) for a, b in (("dkd", "kd_wce1"), ("aekt", "kd_wce1"), ("skd", "kd_wce1"), ("label_mix", "kd_wce1"),
                                 ("professor_kd", "label_mix"), ("aekt", "aekt_no_norm"))
             if "per_seed" in ms.get(a, {}) and "per_seed" in ms.get(b, {})]
    if "inference" in ms.get("imf", {}) and "inference" in ms.get("imf_kd", {}):
        pairs.append(("imf", "imf_kd"))

    def _pair(a, b):
        ra, rb = (ms[x]["inference"] if (a, b) == ("imf", "imf_kd") else ms[x] for x in (a, b))
        return f"{NAMES.get(a, a)} − {NAMES.get(b, b)}: {_d(paired(ra, rb))}"
    return "; ".join(_pair(a, b) for a, b in pairs)


def probe_table(acc: dict, plateau: dict) -> list[str]:
    """The rows the probe trained again at twice the epochs, beside the regime's: does each difference hold?"""
    ms, pm, e, e2 = acc["methods"], plateau["methods"], acc["epochs"], plateau["epochs"]
    lines = ["", f"**At twice the epochs** (`{plateau['command']}`): these rows trained again for {e2} epochs, the "
             f"same seeds, caches and one-cycle schedule (its length doubled); test accuracy, its paired gain over the "
             f"regime's {e} epochs, and the paired differences to CE and to KD at both lengths (points).", "",
             f"| method | test acc at {e2} | gain from {e} | vs CE at {e} | vs CE at {e2} | vs KD at {e} | vs KD at {e2} |",
             "|---|---|---|---|---|---|---|"]
    rows = [(NAMES.get(m, m), ms[m], r) for m, r in pm.items() if m in ms]
    rows += [(f"{NAMES.get(m, m).split(' (')[0]}, exported inference model", ms[m]["inference"], r["inference"])
             for m, r in pm.items() if "inference" in r and "inference" in ms.get(m, {})]
    for label, r, p in rows:
        vs = [_d(paired(x, base[b])) if b in base and x is not base[b] else "—" for b in ("ce", "kd") for x, base in
              ((r, ms), (p, pm))]
        lines.append(f"| {label} | {100 * p['test_acc_mean']:.2f} | {_d(paired(p, r))} | " + " | ".join(vs) + " |")
    if pairs := baseline_pairs(pm):
        lines.append(f"\nAt {e2} epochs, against the baselines that could explain a gain (IMF: the exported models): "
                     f"{pairs}.")
    return lines


def markdown(profile: str, acc, speed, build, sweep, suite, plateau=None) -> str:
    folder = f"bench/results/{profile}"  # image links are relative to docs/benchmarks.md
    lines = []
    if suite:
        lines.append(f"`{suite['command']}` ({suite['date']}, {suite['minutes']:.0f} min on this 2-core machine); "
                     f"every JSON, the plots and this text are in `{folder}/`"
                     + (f" ({suite['note']})" if suite.get("note") else "") + ".\n")
    if acc:
        t = acc["teachers"]
        c = acc["cache"]
        n = len(acc["seeds"])
        ms = acc["methods"]
        where = "every training image" if acc.get("teachers_on_all_data") else "the students' images"
        views = acc.get("views_per_cache") or {"features": acc["views"]}
        lines += [
            f"**Accuracy per method** — {acc['dataset']}: teachers trained on {where} ("
            + ", ".join(f"{k} {100 * v['test_acc']:.2f} %" for k, v in t.items())
            + f" test), students on {acc['train_samples']:,} of them; caches of K = "
            + " / ".join(f"{v} ({k})" for k, v in views.items())
            + f" views; student {acc['student']}, {acc['epochs']} epochs, batch {acc['batch_size']}; "
            f"{n} paired seed{'s' if n > 1 else ''} ({', '.join(map(str, acc['seeds']))}: initialisation and "
            f"shuffling, the same caches). Test accuracy mean ± 95 % CI (Student's t) over seeds; **vs CE / vs KD**: "
            f"the paired difference per seed, mean ± 95 % CI, in points (KD = the teachers' mean probability).",
            "",
            "| method | test acc | vs CE | vs KD | val acc | deployed params | method params | train time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        one = n == 1
        for label, r in accuracy_rows(acc):
            tt = f"{r['train_time_s']:.0f} s" if r.get("train_time_s") else "—"
            val = _pm(r["val_acc_mean"], None if one else r.get("val_acc_ci95", r["val_acc_std"])) if "val_acc_mean" in r else "—"
            test = _pm(r["test_acc_mean"], None if one else r.get("test_acc_ci95", r["test_acc_std"]))
            vs = [_d(paired(r, ms[b])) if b in ms and r is not ms[b] and "per_seed" in r else "—" for b in ("ce", "kd")]
            mp = f"{r['method_params']:,}" if r.get("method_params") else "—"
            lines.append(f"| {label} | {test} | {vs[0]} | {vs[1]} | {val} | {r['params']:,} | {mp} | {tt} |")
        if pairs := baseline_pairs(ms):
            lines.append("\nPaired differences against the baselines that could explain a gain (points, mean ± 95 % CI; "
                         "IMF: the exported models): " + pairs + ".")
        if probe_of(acc, plateau) and set(plateau["methods"]) - {"ce", "kd"}:
            lines += probe_table(acc, plateau)
        imf = ms.get("imf", {}).get("inference")
        if imf:
            lines.append(f"\nIMF's exported model: {imf['params']:,} parameters and {imf['flops']:,} FLOPs per image "
                         f"against the full student's {ms['imf']['params']:,} and {imf['student_flops']:,}.")
        for kind, p in (acc.get("professor") or {}).items():
            h = p.get("heldout") or {}
            if h.get("rows"):
                lines.append(
                    f"\nProfessor (on the {kind} cache), on {h['rows']:,} held-out view rows it never trained on: refined "
                    f"targets {100 * h['refined_acc']:.2f} % correct against the teachers' {100 * h['teacher_acc']:.2f} % "
                    f"({100 * h['fixed']:.1f} % of the teachers' errors fixed, {100 * h['broken']:.1f} % of their right "
                    f"answers broken); total-variation distance to the teachers' targets {h['tv_teachers']:.3f}, to "
                    f"the label mix {h['tv_label_mix']:.3f}; entropy {h['entropy_refined']:.3f} (teachers "
                    f"{h['entropy_teachers']:.3f}); correlation of the non-target probabilities with the teachers' "
                    f"{h['nontarget_corr']:.3f}.")
        lines.append(
            f"\nFeature cache: {c['bytes'] / 2**20:.1f} MiB, **{c['bytes_per_sample']:,.0f} B per training sample** over "
            f"its views with the {c['feat_dtype']} feature maps ({', '.join(f'{k}: {v}' for k, v in c['layers'].items())}),"
            f" {c['bytes_per_sample_without_features']:,.0f} B without them; built in {c['build_s']:.0f} s. "
            f"Times: teachers {acc['time_s']['teachers'] / 60:.1f} min, caches {acc['time_s']['cache'] / 60:.1f} min, "
            f"students {acc['time_s']['students'] / 60:.1f} min.")
        lines.append(f"\n![accuracy per method](../{folder}/accuracy.png) ![val accuracy per epoch](../{folder}/accuracy_vs_epoch.png)\n")
    if speed:
        rows = speed["modes"]
        ce = rows["ce"]["median_epoch_s"]
        lines += [f"**Epoch time** (`{speed['command']}`): {speed['student']}, one worker (in the command's own process), median over "
                  "every epoch but each run's first.", "", "| mode | median epoch | samples/s | ratio to CE |",
                  "|---|---|---|---|"]
        for mode, label in (("ce", "CE"), ("kd_cached", "KD from the cache"), ("kd_online", "KD, teachers online")):
            r = rows[mode]
            lines.append(f"| {label} | {r['median_epoch_s']:.2f} s | {r['samples_per_s']:,.0f} | {r['median_epoch_s'] / ce:.2f} |")
        lines.append(f"\n![epoch time](../{folder}/epoch_time.png)\n")
    if build:
        lines.append(f"**Cache build** (`{build['command']}`): {build['train_samples']:,} samples × {build['views']} views × "
                     f"{len(build['teachers'])} teachers: plain torch loop {build['torch_loop_s']:.1f} s, `raykd cache` "
                     f"{build['cache_build_s']:.1f} s (+ ray.init {build['ray_init_s']:.1f} s): throughput ratio "
                     f"**{build['throughput_ratio']:.3f}**; {build['bytes_per_sample']:,.0f} B per sample without features.\n")
    if sweep:
        lines.append(f"**Sweep** (`{sweep['command']}`): {sweep['cached']['trials']} trials, {sweep['epochs']} epochs: "
                     f"cache build {sweep['cache_build_s']:.0f} s + cached trials = {sweep['cached']['total_s']:.0f} s "
                     f"against {sweep['online']['total_s']:.0f} s with the teachers online: ratio **{sweep['ratio']:.3f}**.\n")
    if acc and (vd := verdicts(acc["methods"])):
        lines += ["**Verdicts** — each seed method against its nearest baselines (paired by seed; reproduced: 95 % CI "
                  "above 0 against every one):", "", "| method | verdict | measured |", "|---|---|---|"]
        lines += [f"| {m} | {v} | {d} |" for m, v, d in vd]
        lines.append("")
    tg = targets(acc, speed, build, sweep, plateau)
    if tg:
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'—' if ok is None else 'yes' if ok else '**no**'} |" for t, m, ok in tg]
    return "\n".join(lines) + "\n"


def plots(folder: str, acc, speed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if acc:
        rows = accuracy_rows(acc)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        y = range(len(rows))
        err = [100 * r.get("test_acc_ci95", r["test_acc_std"]) for _, r in rows]
        ax.barh(y, [100 * r["test_acc_mean"] for _, r in rows], xerr=err,
                color="tab:blue", alpha=0.8, capsize=3)
        ax.axvline(100 * acc["methods"]["ce"]["test_acc_mean"], color="k", ls="--", lw=1, label="CE")
        ax.set_yticks(list(y), [label.replace("`", "") for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        lo = min(100 * r["test_acc_mean"] - e for (_, r), e in zip(rows, err))
        ax.set_xlim(lo - 1, None)
        ax.set_xlabel(f"test accuracy % (mean ± 95 % CI over {len(acc['seeds'])} seeds)")
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
    ap.add_argument("--readme", action="store_true", help="replace docs/benchmarks.md's text between the bench markers")
    args = ap.parse_args()
    folder = os.path.join(ROOT, "bench", "results", args.profile)
    res = [_load(folder, n) for n in ("accuracy", "distill_speed", "cache_build", "sweep_speed", "suite", "plateau")]
    if not any(res[:4]):
        raise SystemExit(f"no results in {folder}: run `python bench/run.py --profile {args.profile}` first")
    plots(folder, res[0], res[1])
    text = markdown(args.profile, *res)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        path = os.path.join(ROOT, "docs", "benchmarks.md")
        readme = open(path).read()
        tag = "bench" if args.profile == "full" else f"bench-{args.profile}"
        pat = re.compile(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", re.S)
        if not pat.search(readme):
            raise SystemExit(f"docs/benchmarks.md has no <!-- {tag}:start --> ... <!-- {tag}:end --> markers")
        open(path, "w").write(pat.sub(lambda mt: mt.group(1) + text + mt.group(2), readme))
        print("docs/benchmarks.md: benchmark section rewritten")


if __name__ == "__main__":
    main()
