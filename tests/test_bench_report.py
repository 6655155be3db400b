"""bench/report.py's verdicts from made-up result JSONs (shapes only: the numbers are chosen so each
verdict is known): a probe counts only for its own regime, and the probed rows' targets are judged at its
length with differences paired by seed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import report  # noqa: E402  (bench/report.py)

SEEDS = ["0", "1", "2", "3", "4"]


def _row(*accs):
    return {"per_seed": dict(zip(SEEDS, accs)), "test_acc_mean": sum(accs) / len(accs)}


def _at(base):
    """A row whose seeds spread as every other row's: paired differences have no spread."""
    return _row(*(base + d for d in (0.0, 0.002, 0.004, 0.001, 0.003)))


def _acc():
    return {"epochs": 32, "batch_size": 64, "lr": 0.2, "methods": {
        "ce": _at(0.860), "kd": _at(0.870), "kd_best": _at(0.872),
        "kd_entropy": {**_at(0.869), "val_acc_mean": 0.87},  # 0.3 below kd_best in every seed
        "professor_kd": _at(0.865), "label_mix": _at(0.871),
    }}


def _probe(**regime):
    def up(r, d):
        return _row(*(v + d for v in r["per_seed"].values()))
    ms = _acc()["methods"]
    return {"command": "python bench/plateau.py --methods ...", "epochs": 64, "regime_epochs": 32,
            "regime_batch_size": 64, "regime_lr": 0.2, **regime, "methods": {
                "ce": up(ms["ce"], 0.004), "kd": up(ms["kd"], 0.002), "kd_best": up(ms["kd_best"], 0.0),
                # at 64 epochs EBKD passes the best single teacher by 0.2 in every seed
                "kd_entropy": {**up(ms["kd_entropy"], 0.005), "val_acc_mean": 0.875}, "professor_kd": up(ms["professor_kd"], 0.002),
                "label_mix": up(ms["label_mix"], 0.0)}}


def test_a_probe_of_another_regime_is_not_read():
    acc = _acc()
    for other in ({"regime_lr": 0.05}, {"regime_batch_size": 128}, {"regime_epochs": 16}):
        tg = report.targets(acc, None, None, None, _probe(**other))
        conv = [t for t in tg if t[0].startswith("students trained long enough")]
        assert conv[0][2] is None and "no probe of this regime" in conv[0][1]
        assert not [t for t in tg if "at 64 epochs" in t[0]]
        assert report.probe_of(acc, _probe(**other)) is False


def test_the_probed_rows_targets_are_judged_at_its_length():
    acc, probe = _acc(), _probe()
    tg = {t[0]: t for t in report.targets(acc, None, None, None, probe)}
    conv = tg["students trained long enough (twice the epochs moves CE and KD by ≤ 0.5 pp, paired)"]
    assert conv[2] is True and "+0.40 ± 0.00 pp at 64 epochs" in conv[1]  # CE +0.4, KD +0.2: both ≤ 0.5
    best = "best per-sample ensemble (KD, entropy weights (EBKD)) ≥ KD, best single teacher (paired 95 % CI above 0)"
    assert tg[best][2] is False and tg[best][1].startswith("-0.30")
    assert tg[best + ", at 64 epochs"][2] is True and tg[best + ", at 64 epochs"][1].startswith("+0.20")
    prof = "professor + KD > label-mix KD"
    assert tg[prof][2] is False and tg[prof + ", at 64 epochs"][2] is False
    above = tg["every method probed above CE (paired 95 % CI above 0), at 64 epochs"]
    assert above[2] is True and above[1] == "all"  # every probed method beats CE by ≥ 0.2 in every seed


def test_the_probe_table_pairs_each_row_with_its_regime_row():
    lines = report.probe_table(_acc(), _probe())
    rows = {ln.split(" | ")[0].lstrip("| "): ln.strip("| ").split(" | ") for ln in lines if ln.startswith("| ")}
    ebkd = rows["KD, entropy weights (EBKD)"]
    assert ebkd[1] == "87.60"
    assert ebkd[2] == "+0.50 ± 0.00"            # gain from 32 epochs, paired
    assert ebkd[3] == "+0.90 ± 0.00"            # vs CE at 32
    assert ebkd[4] == "+1.00 ± 0.00"            # vs CE at 64 (CE gained 0.4, EBKD 0.5)
    assert ebkd[5] == "-0.10 ± 0.00" and ebkd[6] == "+0.20 ± 0.00"  # vs KD at 32 and at 64
    assert rows["CE (no teacher)"][3] == "—"


def test_the_best_ensemble_is_chosen_on_validation_not_test():
    """EBKD has the best test mean, AE-KD the best validation mean: the report judges AE-KD."""
    ms = _acc()["methods"]
    ms["kd_entropy"] = {**_at(0.880), "val_acc_mean": 0.850}
    ms["kd_ae_kd"] = {**_at(0.871), "val_acc_mean": 0.890}
    ms["kd_ca_mkd"] = {**_at(0.875), "val_acc_mean": 0.860}
    assert report.best_by_val(ms, report.ENSEMBLES) == "kd_ae_kd"
    tg = {t[0]: t for t in report.method_targets(ms)}
    best = "best per-sample ensemble (KD, AE-KD (min-norm)) ≥ KD, best single teacher (paired 95 % CI above 0)"
    assert tg[best][1].startswith("-0.10") and tg[best][2] is False  # 87.1 against kd_best's 87.2, every seed
    # without validation accuracy for every candidate, nothing is chosen (never a fallback to test)
    del ms["kd_ca_mkd"]["val_acc_mean"]
    assert report.best_by_val(ms, report.ENSEMBLES) is None
    judged = [t for t in report.method_targets(ms) if t[0].startswith("best per-sample ensemble")]
    assert judged[0][2] is None and "no validation accuracy" in judged[0][1]


def test_verdicts_against_the_nearest_baselines():
    ms = {"kd": _at(0.870), "kd_wce1": _at(0.873), "dkd": _at(0.875), "label_mix": _at(0.871),
          "professor_kd": _at(0.865), "skd": _at(0.874), "skd_fixed": _at(0.876)}
    v = {m: (verdict, measured) for m, verdict, measured in report.verdicts(ms)}
    assert v["DKD"][0] == "reproduced"              # above KD and above KD with w_ce = 1 in every seed
    assert v["professor + KD (`targets: both`)"][0] == "not reproduced"
    assert v["SKD"][0] == "partly" and "-0.20 ± 0.00" in v["SKD"][1]  # above KD, below its reduction
    assert "AEKT" not in v                          # no row: no verdict


def test_verdicts_with_one_cache_judge_feature_methods_against_ce_and_kd():
    """With every row on the feature cache (`--one-cache`) there are no *_features rows: pFEED is judged
    against CE and KD themselves; with two caches, without its own cache's baselines it gets no verdict."""
    ms = {"ce": _at(0.860), "kd": _at(0.870), "pfeed": _at(0.865)}
    assert report.verdicts(ms) == []
    v = {m: (verdict, measured) for m, verdict, measured in report.verdicts(ms, one_cache=True)}
    assert v["pFEED (3 teachers)"][0] == "partly"
    assert "− CE (no teacher) +0.50" in v["pFEED (3 teachers)"][1]
