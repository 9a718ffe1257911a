"""``s4fusion fuse``: fuse infrared-visible pairs given as two files or two folders."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .. import io, tiling
from ..api import (
    GRAPH_LIMIT,
    FusionError,
    PreparedPair,
    default_weights,
    example_pair,
    fuse_prepared,
    load_model,
    prepare_pair,
    resolve_device,
)
from ..allocator import retain_freed_memory
from ..checkpoint import CheckpointError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LIST_LIMIT = 20  # names shown per category in reports
READERS = 2  # threads reading and preparing the next pairs while the network runs
READ_AHEAD_PIXELS = 16_000_000  # pairs up to this size let the next ones be read ahead
WRITES_AHEAD = 2  # fused images waiting to be written before the next batch waits for them

DESCRIPTION = """\
Fuse infrared-visible image pairs with S4Fusion.

  s4fusion fuse --ir IR_FILE --vi VI_FILE --out FUSED.png [--weights W]
  s4fusion fuse --ir IR_FOLDER --vi VI_FOLDER --out OUT_FOLDER [--weights W]
  s4fusion fuse --example --out fused.png --weights W

Folders are matched by file name without extension (ir/0001.tif pairs with
vi/0001.jpg); names without a partner are reported. Each output is named after
its pair (<name>.png in folder mode). The output is colour (fused Y with the
visible image's chroma) unless --gray or the visible image is grey.

Infrared normalisation (--ir-norm): auto = 8-bit / 255 as released, anything
deeper (16-bit, radiometric 14-bit in 16, float) min-max stretched; minmax;
percentile = clip to the --ir-percentiles (default 1 99) then stretch; scale =
divide by the type's range (255 / 65535).

Inputs are never overwritten; outputs are written atomically (temporary file,
then rename) and existing outputs are kept unless --overwrite (or skipped with
--skip-existing, to resume an interrupted folder run). One bad pair does not
stop the others. Exit code: 0 all fused, 1 some pair failed (each is listed
with its reason), 2 nothing could start (bad options, weights, output folder).
"""


class UsageError(Exception):
    """The run cannot start: bad options, paths or output folder."""


@dataclass
class Job:
    infrared: Path
    visible: Path
    output: Path

    @property
    def label(self) -> str:
        return f"{self.infrared} + {self.visible}"


def _int_at_least(value: str, minimum: int, expected: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return n


def _tile(value: str) -> Union[str, int]:
    return value if value == "auto" else _int_at_least(value, 0, "'auto', 0 or a tile size in pixels")


def _positive_int(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="fuse infrared-visible image pairs (files or folders)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("inputs and outputs")
    src.add_argument("--ir", type=Path, help="infrared image file, or folder of infrared images")
    src.add_argument("--vi", type=Path, help="visible image file, or folder of visible images")
    src.add_argument("--example", action="store_true", help="fuse the bundled example pair instead of --ir/--vi")
    src.add_argument(
        "--out", type=Path, required=True,
        help="output file (pair mode; .png .tif .jpg .bmp) or folder (folder mode, or pair mode with an existing "
        "folder / trailing slash: <visible name>.png inside it)",
    )
    src.add_argument(
        "--weights", type=Path,
        help="weights: .safetensors file/folder (save_pretrained), a training checkpoint "
        "(RUN/checkpoints/step_N.pt) or the released .pth/.pkl checkpoint; "
        "default: the weights bundled with the package",
    )
    img = p.add_argument_group("images")
    img.add_argument("--gray", action="store_true", help="write the grey fused image instead of colour")
    img.add_argument("--bits", type=int, choices=(8, 16), default=8, help="bits per sample of the output (default 8)")
    img.add_argument("--ir-norm", choices=io.IR_NORMS, default="auto", help="infrared normalisation (default auto)")
    img.add_argument(
        "--ir-percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), default=io.DEFAULT_PERCENTILES,
        help="percentiles for --ir-norm percentile (default 1 99)",
    )
    img.add_argument(
        "--resize-visible", action="store_true",
        help="resize a visible image whose size differs from its infrared image (antialiased bicubic)",
    )
    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute precision")
    run.add_argument("--batch-size", type=_positive_int, default=4, help="pairs of one size per batch (default 4)")
    run.add_argument(
        "--tile", type=_tile, default="auto",
        help="auto: run band by band only images that would not fit the memory budget; 0: never; "
        "N: bands of an N x N-pixel tile's worth of tokens. Band-wise output equals whole-image output "
        "(scan states are carried across bands)",
    )
    run.add_argument(
        "--memory-budget", type=float, metavar="GIB",
        help="memory for one pass in GiB (default: 60%% of available RAM, 80%% of free GPU memory)",
    )
    run.add_argument(
        "--compile", action="store_true",
        help="run whole-image passes through the network compiled with torch.compile (inductor; on the CPU it "
        "needs a C++ compiler): the first batch of each image size and batch size compiles (tens of seconds), "
        "later ones run faster, so it pays off for many pairs of few sizes. Band-wise passes run uncompiled",
    )
    run.add_argument(
        "--cuda-graph", choices=("auto", "on", "off"), default="auto",
        help="replay whole-image passes on a CUDA device as CUDA graphs, which launch the whole network at once: "
        "auto (default) records one at the second batch of each image size and batch size, when the pass needs "
        f"at most 1/{GRAPH_LIMIT} of the memory budget; on: at the first batch (CUDA only, not with --compile); "
        f"off: never. The {GRAPH_LIMIT} most recent graphs are kept. Band-wise and compiled passes run as usual",
    )
    safe = p.add_argument_group("existing outputs").add_mutually_exclusive_group()
    safe.add_argument("--skip-existing", action="store_true", help="skip pairs whose output exists (resume a run)")
    safe.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    p.set_defaults(func=run_fuse)


# ------------------------------------------------------------------ planning
def _images(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Image files of ``folder`` by name stem, and notes on files not used."""
    by_stem: dict[str, list[Path]] = {}
    notes = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix.lower() not in io.READ_EXTENSIONS:
            notes.append(f"{entry}: not an image extension {io.READ_EXTENSIONS}")
            continue
        by_stem.setdefault(entry.stem, []).append(entry)
    found = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            notes.append(f"{', '.join(map(str, paths))}: several files share the name {stem!r}; keep one")
        else:
            found[stem] = paths[0]
    return found, notes


def _folder_jobs(ir_dir: Path, vi_dir: Path, out_dir: Path) -> tuple[list[Job], list[str]]:
    irs, notes_ir = _images(ir_dir)
    vis, notes_vi = _images(vi_dir)
    notes = notes_ir + notes_vi
    notes += [f"{irs[s]}: no visible image named {s}.* in {vi_dir}" for s in sorted(set(irs) - set(vis))]
    notes += [f"{vis[s]}: no infrared image named {s}.* in {ir_dir}" for s in sorted(set(vis) - set(irs))]
    jobs = [Job(irs[s], vis[s], out_dir / f"{s}.png") for s in sorted(set(irs) & set(vis))]
    return jobs, notes


def _check_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"output folder {folder} cannot be created ({e}); choose another --out") from e
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"output folder {folder} is not writable ({e.strerror or e}); fix its permissions or choose another --out"
        ) from e


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def plan(args: argparse.Namespace) -> tuple[list[Job], list[str]]:
    """Jobs and notes (unmatched or ignored files) from the arguments; raises
    :class:`UsageError` for inconsistent paths, an output that is an input, or an
    output folder that cannot be written."""
    if args.example:
        if args.ir or args.vi:
            raise UsageError("--example fuses the bundled pair: give it without --ir/--vi")
        ir, vi = example_pair()
    else:
        if args.ir is None or args.vi is None:
            raise UsageError("give --ir and --vi (two files or two folders), or --example")
        ir, vi = args.ir, args.vi
    for name, path in (("--ir", ir), ("--vi", vi)):
        if not path.exists():
            raise UsageError(f"{name} {path} does not exist")
    out: Path = args.out
    if ir.is_dir() and vi.is_dir():
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; in folder mode --out must be a folder")
        if _same(out, ir) or _same(out, vi):
            raise UsageError(f"--out {out} is an input folder; outputs could replace inputs: choose another folder")
        _check_folder(out)
        jobs, notes = _folder_jobs(ir, vi, out)
        if not jobs:
            raise UsageError(f"no pairs: no file name of {ir} matches one of {vi}" + "".join(f"\n  {n}" for n in notes))
        return jobs, notes
    if ir.is_dir() or vi.is_dir():
        raise UsageError(f"--ir {ir} and --vi {vi} must both be files or both be folders")
    if out.is_dir() or str(args.out).endswith(("/", os.sep)):
        out = out / f"{vi.stem}.png"
    ext = out.suffix.lower()
    if ext not in io.WRITE_EXTENSIONS:
        raise UsageError(f"--out {out}: cannot write '{ext or 'no extension'}' files; use one of {io.WRITE_EXTENSIONS}")
    if args.bits == 16 and ext not in (".png", ".tif", ".tiff"):
        raise UsageError(f"--out {out}: 16-bit output needs .png or .tif")
    if _same(out, ir) or _same(out, vi):
        raise UsageError(f"--out {out} is one of the inputs; inputs are never overwritten: choose another name")
    _check_folder(out.parent)
    return [Job(ir, vi, out)], []


# ------------------------------------------------------------------- running
def _reason(e: BaseException) -> str:
    if isinstance(e, (io.ImageError, FusionError)):
        return str(e)
    text = f"{type(e).__name__}: {e}"
    if "out of memory" in str(e).lower() or isinstance(e, MemoryError):
        text += " (lower --batch-size or --memory-budget: images over the budget are fused band by band)"
    return text


def _report(lines: list[str], title: str) -> None:
    if not lines:
        return
    print(f"{title} ({len(lines)}):", file=sys.stderr)
    for line in lines[:LIST_LIMIT]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > LIST_LIMIT:
        print(f"  ... and {len(lines) - LIST_LIMIT} more", file=sys.stderr)


def run_fuse(args: argparse.Namespace) -> int:
    """Handler of ``s4fusion fuse``; returns the exit code."""
    try:
        weights = args.weights if args.weights is not None else default_weights()
        device = resolve_device(args.device)
        if args.cuda_graph == "on" and args.compile:
            raise UsageError("choose one of --compile and --cuda-graph on, not both")
        if args.cuda_graph == "on" and device.type != "cuda":
            raise UsageError(f"--cuda-graph on needs a CUDA device, the device is {device}; use --cuda-graph auto or off")
        io.check_percentiles(args.ir_percentiles, "--ir-percentiles")
        if args.memory_budget is not None and args.memory_budget <= 0:
            raise UsageError(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
        jobs, notes = plan(args)
        if device.type == "cpu":
            retain_freed_memory()
        model = load_model(weights, device)
        if args.tile not in ("auto", 0):
            tiling.tile_tokens(model.config, args.tile)
    except (UsageError, CheckpointError, FileNotFoundError, FusionError, io.ImageError, ValueError) as e:
        print(f"s4fusion fuse: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    _report(notes, "not fused (unmatched or ignored files)")

    failures: list[str] = []
    skipped = 0
    todo = []
    for job in jobs:
        if job.output.exists():
            if args.skip_existing:
                skipped += 1
                continue
            if not args.overwrite:
                failures.append(f"{job.label}: output {job.output} already exists (use --overwrite or --skip-existing)")
                continue
        todo.append(job)

    from tqdm import tqdm

    run_options = dict(
        tile=args.tile,
        memory_budget=int(args.memory_budget * 2**30) if args.memory_budget else None,
        precision=args.precision,
        compile=args.compile,
        cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph],
    )
    written: list[Path] = []
    problems: list[tuple[int, str]] = []  # (job number, message): reported in job order
    bar = tqdm(total=len(todo), unit="pair", desc="fusing", disable=None, file=sys.stderr)
    run_options["progress"] = bar.set_postfix_str

    def fused(batch: list[tuple[int, Job, PreparedPair]]) -> list[tuple[int, Job, np.ndarray]]:
        """Run one batch; a failing batch is retried pair by pair."""
        try:
            outs = fuse_prepared(model, [p for _, _, p in batch], gray=args.gray, **run_options)
            return [(i, job, out) for (i, job, _), out in zip(batch, outs)]
        except Exception as e:
            if len(batch) == 1:
                problems.append((batch[0][0], f"{batch[0][1].label}: {_reason(e)}"))
                return []
            return [r for item in batch for r in fused([item])]

    def prepare(job: Job) -> PreparedPair:
        return prepare_pair(
            job.infrared, job.visible, ir_norm=args.ir_norm, ir_percentiles=args.ir_percentiles,
            resize_visible=args.resize_visible, resize_hint="--resize-visible",
        )  # fmt: skip

    # Reading and writing overlap the fusing: while the network runs on this thread,
    # READERS threads prepare the next pairs (read ahead only after a pair of at most
    # READ_AHEAD_PIXELS: very large images are read one at a time, as their memory
    # matters more than their reading time) and one thread encodes and writes the
    # results (at most WRITES_AHEAD waiting).
    readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="s4fusion-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s4fusion-write")
    reads: deque = deque()
    writes: deque = deque()
    pending: list[tuple[int, Job, PreparedPair]] = []

    def finish_write() -> None:
        i, job, future = writes.popleft()
        try:
            written.append(future.result())
        except Exception as e:
            problems.append((i, f"{job.label}: {_reason(e)}"))

    def flush() -> None:
        for i, job, image in fused(pending):
            writes.append((i, job, writer.submit(io.write_image, job.output, image, args.bits, overwrite=args.overwrite)))
            while len(writes) > WRITES_AHEAD:
                finish_write()
        bar.update(len(pending))
        pending.clear()

    jobs_left = iter(enumerate(todo))

    def read_ahead(count: int) -> None:
        while len(reads) < count and (nxt := next(jobs_left, None)) is not None:
            reads.append((*nxt, readers.submit(prepare, nxt[1])))

    try:
        ahead = 0
        while True:
            read_ahead(max(ahead, 1))
            if not reads:
                break
            i, job, future = reads.popleft()
            try:
                pair = future.result()
            except Exception as e:
                problems.append((i, f"{job.label}: {_reason(e)}"))
                bar.update(1)
                continue
            ahead = READERS if pair.infrared.size <= READ_AHEAD_PIXELS else 0
            read_ahead(ahead)
            if pending and (pending[0][2].size != pair.size or len(pending) >= args.batch_size):
                flush()
            pending.append((i, job, pair))
        flush()
        while writes:
            finish_write()
    finally:
        for _, _, future in reads:
            future.cancel()
        readers.shutdown(wait=True)
        writer.shutdown(wait=True)
        bar.close()
    failures += [message for _, message in sorted(problems, key=lambda item: item[0])]

    where = str(jobs[0].output) if len(jobs) == 1 else str(jobs[0].output.parent)
    summary = f"fused {len(written)} of {len(jobs)} pairs -> {where}"
    if skipped:
        summary += f"; skipped {skipped} with an existing output"
    print(summary, file=sys.stderr)
    _report(failures, "FAILED")
    return EXIT_FAILED if failures else EXIT_OK
