"""``s4fusion analyze {delta,features,params}``: the paper's analyses of CMSA.

* ``delta --weights W --data DIR [--out table.csv|table.md]``: the average time
  steps (delta) of Cross SS2D per CMSA layer over the pairs of a dataset folder
  (paper appendix A.3.2, Table 5); see :mod:`s4fusion.analysis`.
* ``features --weights W --ir A --vi B --out grid.png``: the feature maps entering
  and leaving each fusion layer as a PNG grid (paper section 8, Fig. 5).
* ``params``: the parameter count of every ablation variant next to S4Fusion's
  (paper Table 3; :data:`s4fusion.models.ablation.ABLATION_PRESETS`).

Weights (:func:`s4fusion.api.load_model`): a ``.safetensors`` file or folder
written by ``save_pretrained`` (any configuration, ablations included), a
checkpoint of ``s4fusion train`` (``RUN/checkpoints/step_N.pt``), the authors'
released ``{'model': ...}`` checkpoint (``model.pkl`` / ``.pth``), or by
default the weights bundled with the package. Exit codes: 0 done, 1 unusable input
(weights, images, output path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="the paper's analyses: Cross SS2D time steps, CMSA feature maps, ablation sizes",
        description="The paper's analyses of CMSA (appendix A.3 Table 5, section 8 Fig. 5) and the ablation sizes.",
    )
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    d = sub.add_parser(
        "delta",
        help="average Cross SS2D time steps per CMSA layer over a dataset folder (paper Table 5)",
        description=(
            "Average raw delta (before bias and softplus, as the paper's Table 5) of infrared and visible tokens, "
            "the mean softplus steps that move in space (visible -> next infrared) and that cross modality at one "
            "position (infrared -> visible), and the mean C, per CMSA layer, over the pairs of DIR."
        ),
    )
    _weights_args(d)
    d.add_argument("--data", required=True, metavar="DIR", help="dataset folder with ir/ and vi/ (matching names)")
    d.add_argument("--limit", type=int, default=0, metavar="N", help="use only the first N pairs (0: all)")
    d.add_argument(
        "--out", metavar="FILE", help="also write the table: .csv (machine-readable) or .md (Markdown)"
    )
    d.set_defaults(func=_delta)

    f = sub.add_parser(
        "features",
        help="feature maps entering and leaving each fusion layer, as a PNG grid (paper Fig. 5)",
        description=(
            "Write a PNG grid: the input images and the fused image, then for every fusion layer the infrared and "
            "visible features entering it, each stream leaving it and the fused output, reduced over channels and "
            "min-max normalised per panel."
        ),
    )
    _weights_args(f)
    f.add_argument("--ir", required=True, metavar="FILE", help="infrared image")
    f.add_argument("--vi", required=True, metavar="FILE", help="visible image (its Y channel is used)")
    f.add_argument("--out", required=True, metavar="FILE.png", help="output PNG (must not be one of the inputs)")
    f.add_argument(
        "--reduce", choices=("mean", "norm"), default="mean", help="channel reduction: mean (default) or L2 norm"
    )
    f.add_argument("--panel", type=int, default=256, metavar="PX", help="longer side of each panel (default 256)")
    f.set_defaults(func=_features)

    c = sub.add_parser(
        "params",
        help="parameter counts of the ablation variants vs S4Fusion (paper Table 3)",
        description="Build every ablation variant at full size and print its parameter count next to S4Fusion's.",
    )
    c.set_defaults(func=_params)


def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        metavar="W",
        help="weights: .safetensors file/folder from save_pretrained, a training checkpoint "
        "(RUN/checkpoints/step_N.pt), or the released model.pkl/.pth; "
        "default: the weights bundled with the package",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")


def _load_model(args: argparse.Namespace):
    from ..allocator import retain_freed_memory
    from ..api import load_model

    model = load_model(args.weights, args.device)
    if next(model.parameters()).device.type == "cpu":
        retain_freed_memory()
    return model


def _fail(message: str) -> int:
    print(f"s4fusion analyze: {message}", file=sys.stderr)
    return 1


def _write_text(path: Path, text: str) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, text)


def _delta(args: argparse.Namespace) -> int:
    from ..analysis import delta_statistics_folder, format_delta_table
    from ..checkpoint import CheckpointError
    from ..data import DataError

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".md"):
        return _fail(f"--out {out}: the table is written as .csv or .md; choose a file name with one of these")
    if args.limit < 0:
        return _fail(f"--limit must be >= 0, got {args.limit}")
    try:
        model = _load_model(args)
        report = delta_statistics_folder(model, args.data, limit=args.limit or None)
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    for path, reason in report.problems:
        print(f"not used: {path}: {reason}", file=sys.stderr)
    print(f"{len(report.images)} pairs from {args.data}, weights {args.weights or 'bundled with the package'}")
    print(format_delta_table(report.rows, "text"), end="")
    if model.config.topology == "released":
        print("(layer 0: its output is not used by the released decoder, so its weights are never trained)")
    if out is not None:
        _write_text(out, format_delta_table(report.rows, "csv" if out.suffix.lower() == ".csv" else "markdown"))
        print(f"table written to {out}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from ..analysis import save_feature_grid
    from ..checkpoint import CheckpointError
    from ..data import DataError, load_infrared, load_visible

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        return _fail(f"--out {out}: the grid is written as PNG; use a file name ending in .png")
    for name in (args.ir, args.vi):
        if Path(name).exists() and out.exists() and out.resolve() == Path(name).resolve():
            return _fail(f"--out {out} is one of the input images; choose another output file")
    if args.panel < 16:
        return _fail(f"--panel must be at least 16 pixels, got {args.panel}")
    try:
        infrared, visible = load_infrared(args.ir), load_visible(args.vi)
        if infrared.shape != visible.shape:
            return _fail(
                f"{args.ir} is {infrared.shape[-1]}x{infrared.shape[-2]} but {args.vi} is "
                f"{visible.shape[-1]}x{visible.shape[-2]} (W x H); the pair must be registered and of the same size"
            )
        model = _load_model(args)
        layers = save_feature_grid(model, infrared, visible, out, reduce=args.reduce, panel=args.panel)
    except (CheckpointError, DataError, ValueError, OSError) as e:
        return _fail(str(e))
    print(f"feature maps of {len(layers)} fusion layers written to {out}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from ..models.ablation import parameter_table

    rows = parameter_table()
    print(f"{'variant':<16} {'parameters':>12} {'fusion modules':>15} {'vs S4Fusion':>12}")
    for r in rows:
        print(f"{r.name:<16} {r.total:>12,} {r.fusion:>15,} {r.relative:>+12.2%}")
    return 0
