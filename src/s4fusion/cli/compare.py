"""``s4fusion compare``: a figure grid of sources and fused results, as PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_EPILOG = """example (two MSRS test pairs, the three baselines, two zoom boxes):
  s4fusion compare --ir ../shared/data/test/MSRS/ir --vi ../shared/data/test/MSRS/vi \\
      --image 00107D --image 01016N --baseline average --baseline max --baseline laplacian \\
      --zoom 40,200,90,70 --zoom 420,250,90,70 --out grid.png

exit status: 0 written, 2 unusable inputs (missing files, boxes outside the image, ...)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` subcommand."""
    from .evaluate import add_source_and_method_arguments

    p = subparsers.add_parser(
        "compare",
        help="figure grid: infrared, visible and each method's fused image, with zoomed boxes",
        description=(
            "Draw a comparison grid (one row per image pair; columns: infrared, visible, then each "
            "--fused method and --baseline) and save it as PNG. Zoom boxes are outlined on every panel "
            "and magnified under it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    add_source_and_method_arguments(p, "add a reference fusion; repeatable")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME",
        help="pair to show, by file name without extension (folder mode; repeatable, one row each)",
    )
    p.add_argument(
        "--zoom",
        action="append",
        default=[],
        metavar="X,Y,W,H",
        help="box in pixels of the original images to outline and magnify; repeatable",
    )
    p.add_argument("--panel-width", type=int, default=320, help="width of each panel in pixels (default 320)")
    p.add_argument("--out", required=True, type=Path, help="output PNG file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``s4fusion compare``; returns the exit status."""
    from ..evaluation import EvaluationError, baseline_method, parse_fused
    from ..figures import ZoomBox, comparison_grid, save_png

    try:
        if args.out.suffix.lower() != ".png":
            raise EvaluationError(f"--out {args.out}: the grid is written as PNG; give a .png file name")
        methods = [parse_fused(s) for s in args.fused] + [baseline_method(b) for b in args.baseline]
        inputs = [args.ir, args.vi] + [m.path for m in methods if m.path is not None]
        if any(p.exists() and args.out.resolve() == p.resolve() for p in inputs) or any(
            p.is_dir() and args.out.resolve().parent == p.resolve() for p in inputs
        ):
            raise EvaluationError(f"--out {args.out} is inside an input folder or is an input; choose another place")
        zoom = [ZoomBox.parse(z) for z in args.zoom]
        grid = comparison_grid(args.ir, args.vi, methods, args.image, zoom, args.panel_width)
    except (EvaluationError, ValueError) as e:
        print(f"s4fusion compare: error: {e}", file=sys.stderr)
        return 2
    try:
        save_png(grid, args.out)
    except OSError as e:
        print(f"s4fusion compare: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {grid.width}x{grid.height} pixels, {len(grid.getbands())} channels")
    return 0
