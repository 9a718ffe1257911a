"""``s4fusion evaluate``: score fused images with the field's metrics.

Example (the baselines on the MSRS test pairs of ../shared/data)::

    s4fusion evaluate --ir ../shared/data/test/MSRS/ir --vi ../shared/data/test/MSRS/vi \\
        --baseline average --baseline max --baseline laplacian --out eval/

Writes ``metrics_<convention>_per_image.csv``, ``metrics_<convention>.md`` and
``metrics_<convention>.json`` into ``--out`` and prints the mean table.
Exit status: 0 when every image was scored, 1 when some images failed (the
others are scored and written), 2 for unusable inputs (missing folders,
unmatched files without ``--skip-missing``, bad names).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..metrics import CONVENTIONS, METRIC_NAMES

_EPILOG = """example (the baselines on the MSRS test pairs of ../shared/data):
  s4fusion evaluate --ir ../shared/data/test/MSRS/ir --vi ../shared/data/test/MSRS/vi \\
      --baseline average --baseline max --baseline laplacian --out eval/

exit status: 0 all images scored, 1 some images failed (the rest is written),
2 unusable inputs (missing folders, unmatched files without --skip-missing)."""


def add_source_and_method_arguments(p: argparse.ArgumentParser, baseline_help: str) -> None:
    """``--ir``, ``--vi``, ``--fused`` and ``--baseline``, shared by ``evaluate`` and ``compare``."""
    from ..baselines import BASELINES

    p.add_argument("--ir", required=True, type=Path, help="folder of infrared images (or one file)")
    p.add_argument("--vi", required=True, type=Path, help="folder of visible images (or one file)")
    p.add_argument(
        "--fused",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="folder of fused images of one method (or one file); repeat for several methods; "
        "NAME defaults to the folder name",
    )
    p.add_argument("--baseline", action="append", default=[], choices=sorted(BASELINES), help=baseline_help)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""

    p = subparsers.add_parser(
        "evaluate",
        help="score fused images with EN, SD, SF, AG, MI, SCD, CC, PSNR, MSE, VIF, Qabf, Nabf, SSIM, MS-SSIM",
        description=(
            "Score fused images against their infrared and visible sources, as the MATLAB toolbox "
            "(convention 'matlab', the default, used by the S4Fusion paper) or CDDFuse's Evaluator "
            "('cddfuse') computes them. Files are matched by name without extension. One table row per "
            "--fused folder or --baseline."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    add_source_and_method_arguments(p, "add a reference fusion computed on the fly (8-bit, grey); repeatable")
    p.add_argument("--convention", choices=CONVENTIONS, default="matlab", help="metric definitions (default: matlab)")
    p.add_argument(
        "--metrics",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(METRIC_NAMES)} (default: all the convention defines)",
    )
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default: ./evaluation)")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="score only images present for every method instead of failing on unmatched files",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes scoring images in parallel (default: min(4, CPUs))",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``s4fusion evaluate``; returns the exit status."""
    from ..evaluation import EvaluationError, baseline_method, evaluate, format_table, parse_fused, write_outputs

    try:
        methods = [parse_fused(s) for s in args.fused] + [baseline_method(b) for b in args.baseline]
        if args.workers < 1:
            raise EvaluationError(f"--workers must be at least 1, got {args.workers}")
        result = evaluate(
            args.ir,
            args.vi,
            methods,
            convention=args.convention,
            metrics=args.metrics,
            skip_missing=args.skip_missing,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except EvaluationError as e:
        print(f"s4fusion evaluate: error: {e}", file=sys.stderr)
        return 2
    for line in result.problems:
        print(f"skipped: {line}", file=sys.stderr)
    if not result.common_images:
        for method, image, reason in result.failures:
            print(f"failed: {method} / {image}: {reason}", file=sys.stderr)
        print("s4fusion evaluate: error: no image could be scored for every method", file=sys.stderr)
        return 1
    try:
        paths = write_outputs(result, args.out)
    except OSError as e:
        print(f"s4fusion evaluate: error: cannot write to {args.out}: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if result.failures:
        print(f"{len(result.failures)} image(s) failed:", file=sys.stderr)
        for method, image, reason in result.failures:
            print(f"  {method} / {image}: {reason}", file=sys.stderr)
        return 1
    return 0
