"""Throughput of the real trainer (``s4fusion.training.train``): the paper recipe with
the recorded training pass (``cuda_graph = true``, the default) and without it, in
one run, plus the loss's forward and backward alone.

Run from the repository root on a CUDA machine::

    python benchmarks/bench_trainer.py --json trainer.json

Data: ``--pairs`` synthetic 640x480 pairs (PNG, an 8x8-block pattern that compresses
and decodes like photographs do), written to a temporary folder; the ResNet-50 of
the perception loss gets random weights (the same compute as the shipped file)
unless ``--resnet`` names a weights file. Everything else is ``configs/paper.toml``'s
recipe: batch 20 of 229x229 crops with flips, bf16 autocast, all four loss terms,
8 loader processes; the pairs are decoded for every sample unless ``--cache``
(``data.cache``, which the paper config turns on). steps/s is the median of the logged 10-step windows after the
second (the first holds Triton's compilation, the second the recording). On a CPU
both runs are eager (CUDA graphs need CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from bench_gpu import write_json
from PIL import Image

from s4fusion.losses import FusionLoss, LossConfig
from s4fusion.training import train
from s4fusion.training.config import config_from_dict


def synthetic_pairs(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640x480 pairs (grey infrared, RGB visible) under root/ir and root/vi."""
    rng = np.random.default_rng(seed)
    for sub in ("ir", "vi"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        img = np.kron(rng.integers(0, 255, (60, 80), dtype=np.uint8), np.ones((8, 8), dtype=np.uint8))
        Image.fromarray(img).save(root / "ir" / f"p{i:03d}.png")
        Image.fromarray(np.stack([img, img[::-1], img[:, ::-1]], -1)).save(root / "vi" / f"p{i:03d}.png")
    return root


def random_resnet(path: Path) -> Path:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


def run(args: argparse.Namespace, data: Path, resnet: Path, work: Path, graph: bool, steps: int) -> dict:
    config = config_from_dict(
        {
            "run_dir": str(work / f"run_graph_{graph}"), "epochs": 800, "batch_size": args.batch, "max_steps": steps,
            "precision": args.precision, "device": args.device, "log_every": 10, "image_every": 0, "val_every": 0,
            "checkpoint_every": 0, "progress": False, "cuda_graph": graph, "val_metrics": [],
            "data": {"train": [str(data)], "val": [], "workers": args.workers, "crop": args.crop, "cache": args.cache},
            "loss": {"resnet_weights": str(resnet)},
        }
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    windows = [r["steps_per_s"] for r in result.history if r.get("kind") == "train" and "steps_per_s" in r]
    out = {
        "cuda_graph": graph,
        "steps": result.step,
        "wall_s": wall,
        "steps_per_s_windows": windows,
        "steps_per_s": statistics.median(windows[2:] or windows),
    }
    if torch.cuda.is_available():
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(out, flush=True)
    return out


def loss_ms(args: argparse.Namespace, resnet: Path, repeats: int = 15) -> float:
    """Median wall time of the loss's forward and backward on one batch (fused requires grad)."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    loss_fn = FusionLoss(LossConfig(resnet_weights=str(resnet))).to(device)
    shape = (args.batch, 1, args.crop, args.crop)
    ir, vi = torch.rand(shape, device=device), torch.rand(shape, device=device)
    times = []
    for i in range(repeats + 3):
        fused = torch.rand(shape, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(fused, ir, vi)[0].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements to this JSON file")
    parser.add_argument("--pairs", type=int, default=120, help="synthetic training pairs")
    parser.add_argument("--graph-steps", type=int, default=100, help="steps of the run with cuda_graph = true")
    parser.add_argument("--eager-steps", type=int, default=60, help="steps of the run with cuda_graph = false")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--crop", type=int, default=229)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cache", action="store_true", help="decode the pairs once (data.cache)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resnet", help="perception weights file (default: random weights)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_pairs(work / "data", args.pairs)
        resnet = Path(args.resnet) if args.resnet else random_resnet(work / "resnet50_random.pth")
        result = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "runs": [run(args, data, resnet, work, graph, steps)
                     for graph, steps in ((True, args.graph_steps), (False, args.eager_steps))],  # fmt: skip
            "loss_forward_backward_ms": loss_ms(args, resnet),
        }
    for r in result["runs"]:
        print(f"cuda_graph={r['cuda_graph']}: {r['steps_per_s']:.2f} steps/s (median of 10-step windows)")
    print(f"loss forward + backward alone: {result['loss_forward_backward_ms']:.1f} ms")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
