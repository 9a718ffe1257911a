"""``s4fusion train --config FILE [key=value ...] [--resume PATH|auto]``.

Trains S4Fusion with :func:`s4fusion.training.train`. The config file is TOML
(or JSON) with the sections of :class:`s4fusion.training.TrainConfig`; each
``key=value`` overrides one key (``optim.weight_decay=0.05``,
``data.train=["a","b"]``, ``max_steps=100``). Several GPUs:
``torchrun --nproc_per_node N --no-python s4fusion train --config FILE``.
Exit codes: 0 done, 1 the run failed (bad data, diverged, unreadable
checkpoint), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train S4Fusion on paired infrared/visible folders",
        description=(
            "Train S4Fusion. Defaults are the paper's recipe (AdamW, warm-up + cosine 3e-4 -> 1.5e-3 -> 6e-4, "
            "batch 20, 800 epochs, 229x229 crops); see configs/ for examples. "
            "Several GPUs: torchrun --nproc_per_node N --no-python s4fusion train --config FILE."
        ),
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML or JSON config file (sections model, data, loss, optim, schedule)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override one config key, e.g. optim.weight_decay=0.05"
    )
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint, or 'auto': the newest in run_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..perception import PerceptionWeightsError
    from ..training import ConfigError, TrainingDivergedError, load_config, train

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"s4fusion train: configuration error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        result = train(config, resume=args.resume)
    except ConfigError as e:
        print(f"s4fusion train: configuration error: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, PerceptionWeightsError, TrainingDivergedError) as e:
        print(f"s4fusion train: {e}", file=sys.stderr)
        return 1
    if result.final_weights is not None:
        print(f"trained {result.step} steps; weights: {result.final_weights}")
    return 0
