"""`raykd sweep`: Ray Tune trials of `raykd distill` over a search space, every trial reading one cache.

Each trial is a Tune *function* trainable that distils its student exactly as `raykd distill` does
(`run_distill(tune=True)`): a one-worker student trains inside the trial process itself (which holds
the worker's CPUs) and reports every epoch to Tune; a multi-worker one fits a Ray Train TorchTrainer
whose `TuneReportCallback` forwards rank 0's metrics (Ray Train V2 refuses `Tuner(TorchTrainer(...))`).
`sweep.max_concurrent` bounds the trials. A trial's student is named after the trial, so a restored
sweep resumes every unfinished trial from its last epoch checkpoint. Selection uses `sweep.metric`
(validation by default, never test).

Outputs under <out_dir>/sweeps/<name>/: results.csv (sorted, val beside test), results.png, best.yaml
(the best trial's resolved config, runnable as is by `raykd distill -c`), sweep.json, and Tune's own
experiment folder (what `Tuner.restore` resumes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time

from raykd.pipeline.core.config import Config, dump_config, variant
from raykd.pipeline.core.errors import ConfigError, StageFailed
from raykd.pipeline.core.log import log
from raykd.pipeline.core.records import inside, out_root, output_lock
from raykd.pipeline.core.train_sections import DISTRIBUTIONS


def check_space(cfg: Config) -> None:
    """Every key and distribution of `sweep.space` is valid, and every value it can take gives a valid
    config: found here, before any trial starts."""
    sw = cfg.sweep
    if not sw.space:
        raise ConfigError("sweep.space is empty: give at least one {dotted.key: {distribution: values}}")
    for key, dist in sw.space.items():
        where = f"sweep.space.{key}"
        if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: {dist!r} is not one distribution; use one of "
                              f"{', '.join(f'{{{d}: ...}}' for d in DISTRIBUTIONS)}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or values[0] >= values[1]:
                raise ConfigError(f"{where}.{kind}: expected [low, high] numbers with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}.loguniform: the low bound must be > 0, got {values[0]}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}.randint: expected integer bounds, got {values!r}")
        elif sw.search == "grid" and kind not in ("grid", "choice"):
            raise ConfigError(f"{where}: sweep.search=grid needs grid or choice dimensions, got {kind}")
        if sw.search == "optuna" and kind == "grid":
            raise ConfigError(f"{where}: sweep.search=optuna samples its dimensions; use choice instead of grid")
        for v in values:  # every listed value, or both bounds, must make a valid config
            variant(cfg, {key: v}, where)


def sweep_name(cfg: Config) -> str:
    if cfg.sweep.name:
        return cfg.sweep.name
    payload = json.dumps({"sweep": cfg.sweep.model_dump(mode="json"), "base": cfg.model_dump(mode="json", exclude={"sweep"})},
                         sort_keys=True)
    return "sweep-" + hashlib.sha256(payload.encode()).hexdigest()[:10]


def _tune_space(cfg: Config) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    space = {}
    for key, dist in cfg.sweep.space.items():
        kind, values = next(iter(dist.items()))
        if cfg.sweep.search == "grid":
            kind = "grid"
        # Tune nests dotted names; keep each key whole by encoding its dots
        space[key.replace(".", "__")] = make[kind](values)
    return space


def _trial(params: dict, base: dict, name: str, progress, concurrent: int, cwd: str) -> None:
    """One Tune trial: the base config with this trial's values, distilled exactly as `raykd distill` does."""
    from ray import tune

    from raykd.pipeline.stages.students import run_distill

    os.chdir(cwd)  # Tune starts trials in their own working folder: relative paths are the user's
    changes = {k.replace("__", "."): v for k, v in params.items()}
    trial = tune.get_context().get_trial_id()
    cfg = variant(Config.model_validate(base), {**changes, "distill.name": f"{name}-{trial}"}, f"sweep trial {trial}")
    run_distill(cfg, progress=progress, concurrent=concurrent, tune=True)


def run_sweep(cfg: Config) -> dict:
    """Run (or resume) the sweep; returns its summary (also sweep.json)."""
    from raykd.pipeline.cache import Cache, cache_uri

    check_space(cfg)
    if cfg.distill.teachers == "cache":  # the one cache every trial reads; never built here
        Cache(cache_uri(cfg), cfg.cache.s3_endpoint)
    name = sweep_name(cfg)
    root = inside(out_root(cfg), "sweeps")
    out = inside(root, name)
    with output_lock(out, f"sweep {name!r}"):
        return _run_sweep(cfg, name, root, out)


def _run_sweep(cfg: Config, name: str, root: str, out: str) -> dict:
    import ray
    from ray import tune

    from raykd.pipeline.core.progress import ProgressPrinter
    from raykd.pipeline.harness.placement import Placement

    sw = cfg.sweep
    w = cfg.distill.workers
    # trials at once: sweep.max_concurrent, else as many as the cluster's CPUs fit (Tune counts the trials)
    place = Placement.decide(cfg, w, jobs=None, parallel=sw.max_concurrent, inline=False)
    device, concurrent = place.start(), place.parallel
    if w.num_workers == 1:  # the trial trains its student itself: it holds the worker's CPUs (and GPU)
        res = {"cpu": w.cpus_per_worker, **({"gpu": w.gpus_per_worker} if device == "cuda" else {})}
        place.check_fits("distill.workers.cpus_per_worker/gpus_per_worker")
    else:  # its Ray Train workers hold them (a trial's CPU share would starve Ray Data's reads beside them)
        res = {"cpu": 0}
    # raykd turns Tune's per-trial result files off for its other stages; a sweep wants them: they hold
    # every reported epoch of every trial, also of trials ASHA stopped (read when the callbacks are made)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    t0 = time.time()
    with ProgressPrinter() as progress:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=cfg.model_dump(mode="json"), name=name, progress=progress.queue,
                                 concurrent=concurrent, cwd=os.getcwd()),
            # on a cluster the trial stays on this node (it writes the student's files here)
            {**res, "memory": 64 * 2**20, f"node:{ray.util.get_node_ip_address()}": 0.001})
        path = os.path.join(root, name, "tune")
        if tune.Tuner.can_restore(path):
            log.info(f"[sweep] {name}: resuming the interrupted sweep in {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if sw.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(max_t=cfg.distill.optim.epochs, grace_period=sw.grace_period,
                                          reduction_factor=sw.reduction_factor)
            from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

            if sw.search == "optuna":
                try:
                    import optuna
                    from ray.tune.search.optuna import OptunaSearch
                except ImportError:
                    raise ConfigError("sweep.search=optuna needs optuna: pip install 'raykd[optuna]'") from None
                # Optuna's TPE, seeded; the limiter keeps it from proposing more trials than run at once
                search = ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sw.seed)),
                                            max_concurrent=concurrent)
            else:  # our own generator ignores TuneConfig's max_concurrent_trials
                search = BasicVariantGenerator(random_state=sw.seed, max_concurrent=concurrent)
            tuner = tune.Tuner(
                trainable, param_space=_tune_space(cfg),
                tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, scheduler=scheduler,
                                            num_samples=sw.num_samples, search_alg=search),
                # a failed trial starts again and resumes its student from its newest checkpoint
                run_config=tune.RunConfig(name="tune", storage_path=out, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=w.max_failures)))
        log.info(f"[sweep] {name}: {len(sw.space)} dimension(s), {sw.search} search, {concurrent} trial(s) at a time, "
              f"selecting on {sw.metric} ({sw.mode})")
        grid = tuner.fit()
    return _summarise(cfg, name, out, grid, time.time() - t0)


def _trial_id(result) -> str:
    # a trial that failed before its first report has no metrics: its folder is _trial_<id>_<n>_...
    return (result.metrics or {}).get("trial_id") or "_".join(os.path.basename(result.path).split("_")[2:4])


def _summarise(cfg: Config, name: str, out: str, grid, seconds: float) -> dict:
    sw = cfg.sweep
    rows, histories = [], {}
    for r in grid:
        m = r.metrics or {}
        params = {k.replace("__", "."): v for k, v in (r.config or {}).items()}
        trial = _trial_id(r)
        df = r.metrics_dataframe  # every reported epoch, also of trials ASHA stopped
        if df is not None and "val_acc" in df and "epoch" in df:
            histories[trial] = [{"epoch": e, "val_acc": v} for e, v in zip(df["epoch"], df["val_acc"])]
        rows.append({"trial": trial, "student": f"{name}-{trial}", **params, "epochs": m.get("epoch"),
                     **{k: m.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc")},
                     "teachers_loaded": m.get("teachers_loaded"), "error": type(r.error).__name__ if r.error else ""})
    if all(r[sw.metric] is None for r in rows):
        from raykd.pipeline.harness.raysetup import logs_hint

        errors = sorted({r["error"] for r in rows if r["error"]})
        raise StageFailed(f"sweep {name}: no trial reported a result (errors: {', '.join(errors) or 'none'}; each "
                          f"trial's own error is in its folder under {out}/tune){logs_hint()}")
    sign = -1 if sw.mode == "max" else 1
    rows.sort(key=lambda r: (r[sw.metric] is None, sign * (r[sw.metric] or 0), r["trial"]))  # ties: by trial
    best = grid.get_best_result(metric=sw.metric, mode=sw.mode, scope="last")
    best_changes = {k.replace("__", "."): v for k, v in best.config.items()}
    best_cfg = variant(cfg, {**best_changes, "distill.name": None}, "sweep best")
    with open(os.path.join(out, "best.yaml"), "w") as f:
        f.write(f"# best trial of sweep {name} on {sw.metric} ({sw.mode}): {best_changes}\n")
        f.write(dump_config(best_cfg.model_copy(update={"sweep": type(cfg.sweep)()})))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, histories, sw.metric, os.path.join(out, "results.png"))
    interrupted = grid.num_terminated + grid.num_errors < len(grid)
    summary = {"name": name, "metric": sw.metric, "mode": sw.mode, "trials": len(rows), "interrupted": interrupted,
               "best": best_changes,
               "best_val_acc": best.metrics.get("val_acc"), "best_test_acc": best.metrics.get("test_acc"),
               "seconds": round(seconds, 1), "dir": out}
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({**summary, "rows": rows}, f, indent=2, default=str)
    return {**summary, "rows": rows}


def _plot(rows: list[dict], histories: dict[str, list[dict]], metric: str, path: str) -> None:
    """Left: each trial's final val and test accuracy; right: val accuracy per epoch of every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["trial"][-12:] for r in rows]
    a.bar(range(len(rows)), [100 * (r["val_acc"] or math.nan) for r in rows], label="val")
    a.plot(range(len(rows)), [100 * (r["test_acc"] or math.nan) for r in rows], "k_", markersize=14, label="test")
    a.set_xticks(range(len(rows)), names, rotation=60, fontsize=7)
    a.set_ylabel("accuracy (%)")
    a.set_title(f"trials, best first (selected on {metric})")
    a.legend()
    for trial, hist in histories.items():
        if hist:
            b.plot([h["epoch"] for h in hist], [100 * h["val_acc"] for h in hist], marker=".", alpha=0.7,
                   label=trial[-12:])
    if histories and len(histories) <= 12:
        b.legend(fontsize=7)
    b.set_xlabel("epoch")
    b.set_ylabel("val accuracy (%)")
    b.set_title("val accuracy per epoch, every trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_sweep(summary: dict) -> str:
    rows = summary["rows"]
    params = [k for k in rows[0] if k not in ("trial", "student", "epochs", "train_loss", "train_acc", "val_acc", "val_loss",
                                               "test_acc", "teachers_loaded", "error")]
    head = f"{'trial':<24} " + " ".join(f"{p[-22:]:>22}" for p in params) + f" {'epochs':>6} {'val acc':>8} {'test acc':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = " ".join(f"{_fmt(r.get(p)):>22}" for p in params)
        va = f"{100 * r['val_acc']:.2f}%" if r["val_acc"] is not None else "-"
        te = f"{100 * r['test_acc']:.2f}%" if r["test_acc"] is not None else "-"
        lines.append(f"{r['trial'][-24:]:<24} {vals} {r['epochs'] or '-':>6} {va:>8} {te:>9}")
    lines.append(f"\nbest on {summary['metric']}: {summary['best']} -> {summary['dir']}/best.yaml "
                 f"(results.csv, results.png beside it)")
    if summary["interrupted"]:
        lines.append("the sweep was interrupted before every trial ended: the same command resumes it")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
