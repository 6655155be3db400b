"""The `raykd` command: one subcommand per stage, each reading one YAML plus `key=value` overrides."""

from __future__ import annotations

import argparse
import sys

from raykd.pipeline.core.errors import RaykdError


def _stage_parser(sub, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("-c", "--config", help="YAML config (defaults in code; see configs/)")
    p.add_argument("--address", help="connect to this Ray cluster (else RAY_ADDRESS, else start a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. teachers.optim.epochs=5")
    v = p.add_mutually_exclusive_group()  # also after the command; SUPPRESS keeps the top level's when absent
    v.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings, errors and the results")
    v.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="also debug messages")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raykd")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raykd", description="Multi-teacher knowledge distillation on Ray.")
    parser.add_argument("--version", action="version", version=f"raykd {_version()}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the results")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser(sub, "teachers", "train the configured teachers, `teachers.parallel` at a time (or evaluate given checkpoints)")
    c = _stage_parser(sub, "cache", "run the teachers once over K views of every training sample into a Parquet cache")
    c.add_argument("--overwrite", action="store_true", help="replace a cache of other inputs at cache.uri")
    c.add_argument("--repair", action="store_true",
                   help="check every part file against its sha256 and rebuild the views with a damaged one")
    i = sub.add_parser("inspect", help="summarise a cache: manifest, sizes, bytes per column, teacher accuracy")
    i.add_argument("uri", help="cache path or URL (s3://bucket/prefix)")
    i.add_argument("--s3-endpoint", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    i.add_argument("--verify", action="store_true", help="also check every part file against its sha256")
    _stage_parser(sub, "professor", "train the CAAE professor on the cached teacher targets; add the refined column")
    _stage_parser(sub, "distill", "distil one student from the cache (or with the teachers online)")
    r = _stage_parser(sub, "run", "teachers -> cache -> one student per run.compare entry, then the results table")
    r.add_argument("--overwrite", action="store_true", help="replace a cache of other inputs at cache.uri")
    _stage_parser(sub, "sweep", "Ray Tune trials of `raykd distill` over sweep.space, every trial reading one cache")
    _stage_parser(sub, "config", "print the resolved config (defaults <- YAML <- overrides) and exit")
    e = _stage_parser(sub, "export", "write a trained student as ONNX (pixels in [0, 1] -> logits), checked with onnxruntime")
    e.add_argument("--student", required=True, help="the student's name (its folder under <out_dir>/students)")
    e.add_argument("--out", help="the .onnx file (default <student folder>/student.onnx)")
    z = sub.add_parser("zoo", help="list the model zoo with parameters and stage shapes")
    z.add_argument("--image-size", type=int, default=32)
    z.add_argument("--in-chans", type=int, default=3)
    z.add_argument("--num-classes", type=int, default=10)
    return parser


TRAINING = ("teachers", "cache", "professor", "distill", "run", "sweep")


def _load(args):
    from raykd.pipeline.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "address", None):
        cfg.ray.address = args.address
    if args.config is None and args.command in TRAINING:  # said before anything starts
        teachers = "/".join(t.name for t in cfg.teachers.models)
        from raykd.pipeline.core.log import log

        log.warning(f"raykd: no config given (-c): the built-in defaults — {cfg.data.name}, teachers {teachers}, "
                    f"student {cfg.distill.student.arch}, outputs in {cfg.run.out_dir} (configs/ holds ready-to-run ones)")
    return cfg


def cmd_teachers(args) -> int:
    from raykd.pipeline.stages.teachers import format_table, run_teachers

    records = run_teachers(_load(args))
    print()
    print(format_table(records))
    return 0


def cmd_cache(args) -> int:
    from raykd.pipeline.cache import build_cache, cache_uri, inspect_cache

    cfg = _load(args)
    build_cache(cfg, overwrite=args.overwrite, repair=args.repair)
    print()
    print(inspect_cache(cache_uri(cfg), cfg.cache.s3_endpoint))
    return 0


def cmd_professor(args) -> int:
    from raykd.pipeline.cache import cache_uri, inspect_cache
    from raykd.pipeline.stages.professor import run_professor

    cfg = _load(args)
    run_professor(cfg)
    print()
    print(inspect_cache(cache_uri(cfg), cfg.cache.s3_endpoint))
    return 0


def cmd_distill(args) -> int:
    from raykd.pipeline.stages.distill import format_results
    from raykd.pipeline.stages.students import run_distill

    rec = run_distill(_load(args))
    print()
    print(format_results([rec]))
    return 0


def cmd_run(args) -> int:
    from raykd.pipeline.stages.chain import run_all
    from raykd.pipeline.stages.distill import format_results
    from raykd.pipeline.stages.teachers import format_table

    records = run_all(_load(args), overwrite=args.overwrite, on_teachers=lambda t: print(format_table(t), flush=True))
    print()
    print(format_results(records))
    return 0


def cmd_sweep(args) -> int:
    from raykd.pipeline.stages.sweep import format_sweep, run_sweep

    summary = run_sweep(_load(args))
    print()
    print(format_sweep(summary))
    return 0


def cmd_inspect(args) -> int:
    from raykd.pipeline.cache import inspect_cache
    from raykd.pipeline.core.config import check_endpoint

    try:
        check_endpoint(args.s3_endpoint)
    except ValueError as e:
        raise RaykdError(f"--s3-endpoint: {e}") from None

    print(inspect_cache(args.uri, args.s3_endpoint, verify=args.verify))
    return 0


def cmd_config(args) -> int:
    from raykd.pipeline.core.config import dump_config, variant
    from raykd.pipeline.data.datasets import default_views

    cfg = _load(args)
    d, views = cfg.data, default_views(cfg.data.name, cfg.data.image_size)
    if views is not None:  # the data set's own view policy, where the config leaves it to it
        cfg = variant(cfg, {k: v for k, v, own in (("data.pad", views[0], d.pad), ("data.flip", views[1], d.flip))
                            if own is None}, "data")
    print(dump_config(cfg), end="")
    return 0


def cmd_export(args) -> int:
    from raykd.pipeline.stages.export import export_student

    res = export_student(_load(args), args.student, args.out)
    check = "not checked (onnxruntime not installed)" if res["max_abs_diff"] is None else \
        f"onnxruntime agrees with PyTorch (max |diff| {res['max_abs_diff']:.2g})"
    print(f"[export] {res['path']}: input pixels {res['inputs']['pixels']} in [0, 1] -> logits; {check}")
    if "inference" in res:
        print(f"[export] {res['inference']['path']}: IMF's inference model, the same input and output")
    return 0


def cmd_zoo(args) -> int:
    from raykd.pipeline.models.zoo import MODELS, build_model

    for name in MODELS.names():
        m = build_model(name, args.num_classes, args.in_chans)
        shapes = "  ".join(f"{k}={'x'.join(map(str, v))}" for k, v in m.stage_shapes(args.image_size).items())
        print(f"{name:<11} {m.num_params():>10,}  {shapes}")
    return 0


def resume_advice(args, argv: list[str]) -> str:
    """What resumes an interrupted command: the same command, but without --overwrite (which would wipe
    the views the interrupted build committed and start over)."""
    if getattr(args, "overwrite", False):
        again = " ".join(["raykd", *[a for a in argv if a != "--overwrite"]])
        return f"to resume, run it again without --overwrite: {again}"
    return "rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raykd.pipeline.core.log import set_verbosity
    from raykd.pipeline.harness.raysetup import Terminated, sigterm_as_interrupt

    set_verbosity(args.quiet, args.verbose)
    handler = {"teachers": cmd_teachers, "cache": cmd_cache, "inspect": cmd_inspect, "config": cmd_config,
               "zoo": cmd_zoo, "export": cmd_export, "professor": cmd_professor, "distill": cmd_distill, "run": cmd_run,
               "sweep": cmd_sweep}[args.command]
    try:
        with sigterm_as_interrupt():
            return handler(args)
    except RaykdError as e:
        print(f"raykd: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        how = " (SIGTERM)" if isinstance(e, Terminated) else ""
        print(f"raykd: interrupted{how}; {resume_advice(args, argv if argv is not None else sys.argv[1:])}",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
