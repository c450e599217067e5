"""``albef-ray sweep`` and ``albef-ray compare``: ablation sweeps on Ray Tune, their tables from MLflow."""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``compare``.

    Args:
        commands: The top-level subcommands of ``albef-ray``.
    """
    sweep = commands.add_parser(
        "sweep", help="run an ablation sweep (ablations/*.yaml) on Ray Tune, tracked in MLflow",
        description="Expand a sweep file (a base experiment, variants as dotted overrides, an optional grid, "
        "seeds) into trials and validate every trial's config; then run each trial on Ray Tune as a Ray Train "
        "pretraining run followed by zero-shot retrieval on eval.split, max_concurrent_trials at a time. One "
        "MLflow parent run per sweep, one child run per trial. Running the same command again resumes the "
        "sweep: finished trials are kept, unfinished and failed ones run again from their last checkpoint. "
        "Ends with the comparison table (as `albef-ray compare`).",
    )
    sweep.add_argument("spec", metavar="SPEC", help="sweep file, e.g. ablations/table1.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="a.b=c", help="dotted overrides applied to every trial")
    sweep.add_argument("--dry-run", action="store_true", help="list the trials and their overrides, run nothing")
    sweep.set_defaults(func=_sweep)

    compare = commands.add_parser(
        "compare", help="a sweep's comparison table and figures, read back from MLflow",
        description="Read a sweep's trial runs from MLflow; print variant x TR@1/5/10, IR@1/5/10, mean (mean "
        "± std over seeds); write table.md, table.csv, recalls.png and loss_curves.png to --out and log them "
        "as artifacts (comparison/) of the sweep's parent run.",
    )
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="NAME", help="the latest sweep of this name")
    which.add_argument("--run-id", metavar="ID", help="the sweep's MLflow parent run id")
    compare.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db as the sweeps write it)",
    )
    compare.add_argument("--out", metavar="DIR", help="output folder (default: runs/<sweep>/compare)")
    compare.set_defaults(func=_compare)


def _sweep(args: argparse.Namespace) -> int:
    from ..sweep import load_sweep

    sweep = load_sweep(args.spec, args.overrides)  # every trial validated before Ray starts
    print(f"albef-ray sweep: {sweep.spec.name}, {len(sweep.trials)} trial(s) from {args.spec}")
    for trial in sweep.trials:
        print(f"  {trial.key}: " + " ".join(f"{k}={v}" for k, v in trial.overrides.items()))
    if args.dry_run:
        return 0
    from ..compare import compare_sweep
    from ..launch.sweep import run_sweep

    outcome = run_sweep(sweep)
    print(f"finished: {len(outcome.finished)} of {len(sweep.trials)} trial(s)")
    for key, error in outcome.failed.items():
        print(f"  FAILED {key}: {error}")
    if outcome.finished:
        compare_sweep(outcome.tracking_uri, outcome.sweep_dir / "compare", run_id=outcome.parent_run_id)
    from ..tracking import ui_hint

    print(f"MLflow UI: {ui_hint(outcome.tracking_uri)}")
    if outcome.failed:
        print("run the same command again to retry the failed trials (finished ones are kept)")
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..compare import compare_sweep
    from ..config import AlbefConfig
    from ..tracking import resolve_tracking_uri, ui_hint

    defaults = AlbefConfig()
    storage = Path(defaults.run.storage_path).resolve()
    uri = args.tracking_uri or resolve_tracking_uri(defaults, storage)
    out = args.out or storage / (args.sweep or args.run_id) / "compare"
    try:
        compare_sweep(uri, out, sweep=args.sweep, run_id=args.run_id)
    except LookupError as err:
        print(f"albef-ray: compare error: {err.args[0]}", file=sys.stderr)
        return 2
    print(f"MLflow UI: {ui_hint(uri)}")
    return 0
