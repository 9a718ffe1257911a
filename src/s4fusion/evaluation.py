"""Scoring folders of fused images: matching, per-image scores, mean tables.

A *method* is either a folder of fused images (one per source pair, matched by
file stem, i.e. the name without extension, so ``00020N.png`` matches
``00020N.jpg``) or a baseline fusion from :mod:`s4fusion.baselines` computed on
the fly and quantised to 8 bits as a saved PNG would be. Every method is scored
with :func:`s4fusion.metrics.evaluate_pair` against the infrared and visible
files; the mean table averages, per method, the images that every method scored,
so its rows are comparable.

Writers produce a per-image CSV, a Markdown table and a JSON summary; every file
is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .baselines import BASELINES, fuse_baseline
from .io import atomic_write_text
from .metrics import DEFINED, HIGHER_IS_BETTER, METRIC_NAMES, evaluate_pair
from .metrics.inputs import check_convention

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class EvaluationError(ValueError):
    """The inputs of an evaluation cannot be used (missing folders, unmatched files, bad names)."""


@dataclass(frozen=True)
class Method:
    """One row of the table: a folder/file of fused images, or a baseline by name."""

    name: str
    path: Optional[Path] = None
    baseline: Optional[str] = None

    @property
    def source(self) -> str:
        """Human-readable origin: the folder/file as given, or ``baseline:<name>``."""
        return f"baseline:{self.baseline}" if self.baseline else str(self.path)


def parse_fused(spec: str) -> Method:
    """``NAME=PATH`` or ``PATH`` (named after the folder/file stem) -> :class:`Method`."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        p = Path(path)
        name = p.name if p.is_dir() else p.stem
    if not name or not path:
        raise EvaluationError(f"--fused {spec!r}: expected NAME=PATH or PATH")
    return Method(name=name, path=Path(path))


def baseline_method(name: str) -> Method:
    """A :class:`Method` for a baseline of :data:`s4fusion.baselines.BASELINES`."""
    if name not in BASELINES:
        raise EvaluationError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return Method(name=name, baseline=name)


def check_methods(methods: Sequence[Method]) -> None:
    """Raise :class:`EvaluationError` for no method or duplicate names."""
    if not methods:
        raise EvaluationError("nothing to evaluate: give at least one --fused folder or --baseline")
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise EvaluationError(f"two methods are named {m.name!r}; name them with --fused NAME=PATH")
        seen.add(m.name)


def list_images(path: Path, role: str, problems: list[str]) -> dict[str, Path]:
    """Image files of a folder keyed by stem.

    Files with an image extension whose stem occurs twice (``a.png`` and ``a.jpg``)
    are ambiguous: they are left out and reported in ``problems``.
    """
    if not path.is_dir():
        raise EvaluationError(f"{role} folder {path} does not exist or is not a folder")
    found: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(p.stem, []).append(p)
    images = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            problems.append(f"{role}: ambiguous name {stem!r}: {', '.join(q.name for q in paths)} (keep one)")
        else:
            images[stem] = paths[0]
    return images


@dataclass
class Matching:
    """Which images are scored, and what could not be matched."""

    sources: dict[str, tuple[Path, Path]]  # stem -> (infrared, visible)
    fused: dict[str, dict[str, Path]]  # method -> stem -> fused file (folder methods only)
    problems: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted(self.sources)


def match_inputs(ir: Path, vi: Path, methods: Sequence[Method], skip_missing: bool = False) -> Matching:
    """Pair infrared, visible and fused images by stem.

    ``ir``, ``vi`` and each folder method's ``path`` are all folders, or all single
    files (one pair; the files' own names need not agree). Every problem (a source
    without its partner, a fused image missing or without sources, an ambiguous
    name) is collected. Unless ``skip_missing``, any problem raises
    :class:`EvaluationError` listing all of them; with it, the affected images are
    dropped (so every method is scored on the same images) and listed.
    """
    check_methods(methods)
    problems: list[str] = []
    folder_methods = [m for m in methods if m.path is not None]
    if ir.is_file() or vi.is_file():
        for role, p in [("infrared", ir), ("visible", vi)] + [(f"fused {m.name!r}", m.path) for m in folder_methods]:
            if not p.is_file():
                raise EvaluationError(
                    f"{role} {p} is not a file (with a file --ir, --vi and --fused must be files too)"
                )
        stem = ir.stem
        return Matching({stem: (ir, vi)}, {m.name: {stem: m.path} for m in folder_methods})
    ir_images = list_images(ir, "infrared", problems)
    vi_images = list_images(vi, "visible", problems)
    for stem in sorted(set(ir_images) - set(vi_images)):
        problems.append(f"infrared {ir_images[stem].name} has no visible image in {vi}")
    for stem in sorted(set(vi_images) - set(ir_images)):
        problems.append(f"visible {vi_images[stem].name} has no infrared image in {ir}")
    names = set(ir_images) & set(vi_images)
    fused: dict[str, dict[str, Path]] = {}
    keep = set(names)
    for m in folder_methods:
        images = list_images(m.path, f"fused {m.name!r}", problems)
        for stem in sorted(names - set(images)):
            problems.append(f"fused {m.name!r}: no image for {stem} in {m.path}")
        for stem in sorted(set(images) - names):
            problems.append(f"fused {m.name!r}: {images[stem].name} has no infrared/visible pair")
        keep &= set(images)
        fused[m.name] = images
    if problems and not skip_missing:
        raise EvaluationError(
            f"{len(problems)} matching problem(s) (pass --skip-missing to score only the complete pairs):\n  "
            + "\n  ".join(problems)
        )
    if not keep:
        raise EvaluationError("no image is available for every method: nothing to evaluate")
    sources = {s: (ir_images[s], vi_images[s]) for s in sorted(keep)}
    fused = {name: {s: p for s, p in images.items() if s in keep} for name, images in fused.items()}
    return Matching(sources, fused, problems, sorted(names - keep))


def read_baseline_inputs(ir_path: Path, vi_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Infrared grey and visible luma as float64 ``(H, W)`` arrays on [0, 1].

    Infrared: Pillow ``convert('L')``; visible: ``Y = 0.299 R + 0.587 G + 0.114 B``
    of the RGB image (the released S4Fusion's input handling).
    """
    from PIL import Image

    with Image.open(ir_path) as im:
        a = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    with Image.open(vi_path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    if a.shape != y.shape:
        raise ValueError(f"{ir_path} is {a.shape[1]}x{a.shape[0]} but {vi_path} is {y.shape[1]}x{y.shape[0]} (W x H)")
    return a, y


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] float image as an 8-bit PNG writer does: ``floor(clip(255 x) + 0.5)``."""
    return np.floor(np.clip(np.asarray(x, dtype=np.float64) * 255.0, 0.0, 255.0) + 0.5).astype(np.uint8)


def baseline_image(name: str, ir_path: Path, vi_path: Path) -> np.ndarray:
    """The 8-bit grey ``(H, W)`` result of baseline ``name`` on one pair of files."""
    a, y = read_baseline_inputs(ir_path, vi_path)
    return to_uint8(fuse_baseline(name, a, y))


@dataclass(frozen=True)
class _Task:
    method: str
    image: str
    fused: Optional[Path]
    baseline: Optional[str]
    ir: Path
    vi: Path
    convention: str
    metrics: tuple[str, ...]


def _score(task: _Task) -> tuple[str, str, Optional[dict[str, float]], Optional[str]]:
    """Score one image of one method; errors are returned, not raised, so a batch goes on."""
    try:
        fused = task.fused if task.baseline is None else baseline_image(task.baseline, task.ir, task.vi)
        scores = evaluate_pair(fused, task.ir, task.vi, convention=task.convention, metrics=task.metrics)
        return task.method, task.image, scores, None
    except (ValueError, TypeError, OSError) as e:
        return task.method, task.image, None, str(e)


@dataclass
class EvaluationResult:
    """Per-image scores of several methods and what went wrong."""

    convention: str
    metrics: tuple[str, ...]
    methods: list[Method]
    images: list[str]
    scores: dict[str, dict[str, dict[str, float]]]  # method -> image -> metric -> value
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (method, image, reason)
    problems: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def common_images(self) -> list[str]:
        """Images scored for every method: the ones the mean table averages."""
        return [i for i in self.images if all(i in self.scores.get(m.name, {}) for m in self.methods)]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{method: {"mean": {metric: v}, "std": {metric: v}}}`` over :attr:`common_images`.

        ``std`` is the population standard deviation over images. A NaN score makes
        that mean NaN (as a spreadsheet average of the toolbox output would be).
        """
        common = self.common_images
        out = {}
        for m in self.methods:
            if common:
                table = np.array([[self.scores[m.name][i][k] for k in self.metrics] for i in common], dtype=np.float64)
                with np.errstate(invalid="ignore"):
                    mean, std = table.mean(axis=0), table.std(axis=0)
            else:
                mean = std = np.full(len(self.metrics), np.nan)
            out[m.name] = {
                "mean": dict(zip(self.metrics, map(float, mean))),
                "std": dict(zip(self.metrics, map(float, std))),
            }
        return out


def evaluate(
    ir: Path,
    vi: Path,
    methods: Sequence[Method],
    convention: str = "matlab",
    metrics: Optional[Iterable[str]] = None,
    skip_missing: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> EvaluationResult:
    """Score every method on every matched pair (see :func:`match_inputs`).

    Args:
        ir, vi: folders (or single files) of infrared and visible images.
        methods: fused folders/files and baselines (see :func:`parse_fused`,
            :func:`baseline_method`).
        convention: ``"matlab"`` or ``"cddfuse"``.
        metrics: metric names; default: every metric the convention defines.
        skip_missing: drop unmatched images instead of failing.
        workers: processes scoring images in parallel (1 = in this process).
        progress: show a tqdm progress bar on stderr.

    Images that fail (unreadable, size mismatch, ...) are recorded in
    ``failures`` and the others are still scored.
    """
    check_convention(convention)
    names = tuple(metrics) if metrics is not None else DEFINED[convention]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    undefined = [m for m in names if m not in DEFINED[convention]]
    if undefined:
        raise EvaluationError(
            f"{', '.join(undefined)} not defined in the {convention} convention (CDDFuse's Evaluator has no "
            "Nabf or MS-SSIM); use --convention matlab for them"
        )
    matching = match_inputs(Path(ir), Path(vi), methods, skip_missing)
    tasks = [
        _Task(
            m.name,
            stem,
            matching.fused[m.name][stem] if m.path is not None else None,
            m.baseline,
            ir_path,
            vi_path,
            convention,
            names,
        )
        for stem, (ir_path, vi_path) in matching.sources.items()
        for m in methods
    ]
    result = EvaluationResult(
        convention, names, list(methods), matching.names, {m.name: {} for m in methods},
        problems=matching.problems, dropped=matching.dropped,
    )  # fmt: skip
    for method, image, scores, error in _run(tasks, workers, progress):
        if error is None:
            result.scores[method][image] = scores
        else:
            result.failures.append((method, image, error))
    return result


def _run(tasks: list[_Task], workers: int, progress: bool) -> Iterator[tuple]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="img", desc="scoring", dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results: Iterable = map(_score, tasks)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_score, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers))))
        try:
            for r in results:
                if bar is not None:
                    bar.update(1)
                yield r
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------- writers


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4f}"


def _best(result: EvaluationResult, summary: dict) -> dict[str, Optional[str]]:
    """Best method per metric (None when fewer than two finite values)."""
    best: dict[str, Optional[str]] = {}
    for k in result.metrics:
        values = [(summary[m.name]["mean"][k], m.name) for m in result.methods]
        finite = [(v, n) for v, n in values if math.isfinite(v)]
        if len(finite) < 2:
            best[k] = None
            continue
        pick = max if HIGHER_IS_BETTER[k] else min
        best[k] = pick(finite)[1]
    return best


def format_table(result: EvaluationResult) -> str:
    """The mean table as aligned plain text for the terminal."""
    summary = result.summary()
    n = len(result.common_images)
    header = ["method"] + list(result.metrics)
    rows = [[m.name] + [_fmt(summary[m.name]["mean"][k]) for k in result.metrics] for m in result.methods]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"mean over {n} image(s), {result.convention} convention")
    return "\n".join(lines)


def markdown_table(result: EvaluationResult) -> str:
    """The mean table in Markdown, best value per column in bold (MSE and Nabf: lowest)."""
    summary = result.summary()
    best = _best(result, summary)
    arrows = {k: "↑" if HIGHER_IS_BETTER[k] else "↓" for k in result.metrics}
    lines = [
        "| Method | " + " | ".join(f"{k} {arrows[k]}" for k in result.metrics) + " |",
        "|---|" + "---:|" * len(result.metrics),
    ]
    for m in result.methods:
        cells = []
        for k in result.metrics:
            text = _fmt(summary[m.name]["mean"][k])
            cells.append(f"**{text}**" if best[k] == m.name else text)
        lines.append(f"| {m.name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean over {len(result.common_images)} image(s); `{result.convention}` convention "
        "(`s4fusion.metrics`, ../shared/reference/METRICS.md)."
    )
    return "\n".join(lines) + "\n"


def _json_number(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def summary_json(result: EvaluationResult) -> str:
    """JSON summary: convention, metrics, per-method mean/std, images, problems, failures.

    Non-finite values (NaN, inf) are written as ``null``.
    """
    summary = result.summary()
    doc = {
        "convention": result.convention,
        "metrics": list(result.metrics),
        "images": result.common_images,
        "methods": [
            {
                "name": m.name,
                "source": m.source,
                "n": len(result.common_images),
                "mean": {k: _json_number(v) for k, v in summary[m.name]["mean"].items()},
                "std": {k: _json_number(v) for k, v in summary[m.name]["std"].items()},
            }
            for m in result.methods
        ],
        "matching_problems": result.problems,
        "dropped": result.dropped,
        "failures": [{"method": m, "image": i, "reason": r} for m, i, r in result.failures],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def per_image_csv(result: EvaluationResult) -> str:
    """One row per (method, image) that was scored: ``method,image,<metrics...>``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "image", *result.metrics])
    for m in result.methods:
        for image in result.images:
            scores = result.scores[m.name].get(image)
            if scores is not None:
                writer.writerow([m.name, image, *(repr(float(scores[k])) for k in result.metrics)])
    return buf.getvalue()


def output_paths(out_dir: Path, convention: str) -> dict[str, Path]:
    """Where :func:`write_outputs` puts the CSV, Markdown and JSON files."""
    out_dir = Path(out_dir)
    return {
        "csv": out_dir / f"metrics_{convention}_per_image.csv",
        "markdown": out_dir / f"metrics_{convention}.md",
        "json": out_dir / f"metrics_{convention}.json",
    }


def write_outputs(result: EvaluationResult, out_dir: Path) -> dict[str, Path]:
    """Write the per-image CSV, the Markdown table and the JSON summary into ``out_dir``."""
    paths = output_paths(out_dir, result.convention)
    atomic_write_text(paths["csv"], per_image_csv(result))
    atomic_write_text(paths["markdown"], markdown_table(result))
    atomic_write_text(paths["json"], summary_json(result))
    return paths
