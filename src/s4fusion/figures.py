"""Figure grids for qualitative comparisons (Pillow only).

A grid has one row per image pair and one column per panel (infrared, visible,
then each method's fused image), a title above each column and optionally the
image name left of each row. Zoom boxes, given in pixel coordinates of the
original images, are outlined on every panel, and their magnified contents are
shown in a strip under the panel, each framed in its box's colour.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .evaluation import Method

ZOOM_COLOURS: tuple[tuple[int, int, int], ...] = ((230, 40, 40), (40, 200, 60), (50, 110, 255), (250, 200, 0))
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_GAP = 6  # pixels between panels
_FRAME = 2  # zoom box outline width


@dataclass(frozen=True)
class ZoomBox:
    """A rectangle ``(x, y, width, height)`` in pixels of the original images."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> "ZoomBox":
        """``"X,Y,W,H"`` -> :class:`ZoomBox`; raises ``ValueError`` with the text on bad input."""
        parts = text.split(",")
        try:
            x, y, w, h = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"zoom box {text!r}: expected four integers X,Y,W,H") from None
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise ValueError(f"zoom box {text!r}: X and Y must be >= 0, W and H > 0")
        return cls(x, y, w, h)

    def check_inside(self, size: tuple[int, int], what: str) -> None:
        """Raise ``ValueError`` if the box leaves an image of ``size = (W, H)``."""
        if self.x + self.width > size[0] or self.y + self.height > size[1]:
            raise ValueError(
                f"zoom box {self.x},{self.y},{self.width},{self.height} leaves {what} "
                f"({size[0]}x{size[1]} pixels, W x H)"
            )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _panel(image: Image.Image, width: int, boxes: Sequence[ZoomBox], what: str) -> Image.Image:
    """One panel: the image scaled to ``width`` with box outlines, and its zoom strip below."""
    image = image.convert("RGB")
    scale = width / image.width
    height = max(1, round(image.height * scale))
    shown = image.resize((width, height), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(shown)
    for i, box in enumerate(boxes):
        box.check_inside(image.size, what)
        colour = ZOOM_COLOURS[i % len(ZOOM_COLOURS)]
        draw.rectangle(
            [box.x * scale, box.y * scale, (box.x + box.width) * scale - 1, (box.y + box.height) * scale - 1],
            outline=colour,
            width=_FRAME,
        )
    if not boxes:
        return shown
    slot = (width - _GAP * (len(boxes) - 1)) // len(boxes)
    crops = []
    for i, box in enumerate(boxes):
        crop = image.crop((box.x, box.y, box.x + box.width, box.y + box.height))
        crop_h = max(1, round(box.height * slot / box.width))
        crop = crop.resize((slot, crop_h), Image.Resampling.NEAREST if slot >= box.width else Image.Resampling.LANCZOS)
        ImageDraw.Draw(crop).rectangle(
            [0, 0, slot - 1, crop_h - 1], outline=ZOOM_COLOURS[i % len(ZOOM_COLOURS)], width=_FRAME
        )
        crops.append(crop)
    strip_h = max(c.height for c in crops)
    out = Image.new("RGB", (width, height + _GAP + strip_h), _BACKGROUND)
    out.paste(shown, (0, 0))
    for i, crop in enumerate(crops):
        out.paste(crop, (i * (slot + _GAP), height + _GAP))
    return out


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    titles: Sequence[str],
    row_labels: Optional[Sequence[str]] = None,
    zoom: Sequence[ZoomBox] = (),
    panel_width: int = 320,
    font_size: int = 18,
) -> Image.Image:
    """Assemble a comparison grid.

    Args:
        rows: per row, one PIL image per column (grey or colour; the images of one
            row must have the same size, since the zoom boxes refer to it).
        titles: one column title per panel.
        row_labels: optional text left of each row (e.g. the image name).
        zoom: boxes in original-image pixels, outlined and magnified on every panel.
        panel_width: width of each panel in the figure, in pixels.
        font_size: title font size in pixels.

    Returns:
        An RGB ``PIL.Image``.
    """
    if not rows:
        raise ValueError("a figure grid needs at least one row")
    if panel_width < 16:
        raise ValueError(f"panel width {panel_width} is too small (at least 16 pixels)")
    ncols = len(titles)
    for r, row in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(f"row {r} has {len(row)} panels but there are {ncols} titles")
        sizes = {im.size for im in row}
        if len(sizes) > 1:
            label = row_labels[r] if row_labels else str(r)
            raise ValueError(f"row {label!r}: panels differ in size {sorted(sizes)}; all images of a row must match")
    font = _font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max(_text_size(scratch, t, font)[1] for t in titles) + _GAP * 2
    label_w = 0
    if row_labels:
        label_w = max(_text_size(scratch, t, font)[0] for t in row_labels) + _GAP * 2
    rendered = [
        [
            _panel(im, panel_width, zoom, f"{titles[c]} of {row_labels[r] if row_labels else f'row {r}'}")
            for c, im in enumerate(row)
        ]
        for r, row in enumerate(rows)
    ]
    row_heights = [max(p.height for p in row) for row in rendered]
    width = label_w + ncols * panel_width + (ncols + 1) * _GAP
    height = title_h + sum(row_heights) + (len(rows) + 1) * _GAP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        tw, _ = _text_size(draw, title, font)
        x0 = label_w + _GAP + c * (panel_width + _GAP)
        draw.text((x0 + (panel_width - tw) / 2, _GAP), title, fill=_TEXT, font=font)
    y = title_h + _GAP
    for r, row in enumerate(rendered):
        if row_labels:
            _, th = _text_size(draw, row_labels[r], font)
            draw.text((_GAP, y + (row_heights[r] - th) / 2), row_labels[r], fill=_TEXT, font=font)
        for c, panel in enumerate(row):
            canvas.paste(panel, (label_w + _GAP + c * (panel_width + _GAP), y))
        y += row_heights[r] + _GAP
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    """Save ``image`` as PNG atomically (temporary file in the same folder, then ``os.replace``)."""
    from .io import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(Path(path), buf.getvalue())


def _open(path: Path, mode: Optional[str] = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None:
                return im.convert(mode)
            return im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def comparison_grid(
    ir: Path,
    vi: Path,
    methods: Sequence["Method"],
    images: Sequence[str] = (),
    zoom: Sequence[ZoomBox] = (),
    panel_width: int = 320,
) -> Image.Image:
    """Grid of infrared, visible and each method's result for some image pairs.

    Args:
        ir, vi: folders of source images (then ``images`` names the rows by file
            stem), or two files (one row).
        methods: fused folders/files and baselines, as for ``s4fusion evaluate``
            (:func:`s4fusion.evaluation.parse_fused`, :func:`~s4fusion.evaluation.baseline_method`).
        images: stems of the pairs to show, one row each (folder mode only).
        zoom: boxes to outline and magnify on every panel.
        panel_width: width of each panel in pixels.
    """
    from .evaluation import EvaluationError, baseline_image, check_methods, list_images

    check_methods(methods)
    ir, vi = Path(ir), Path(vi)
    folder_methods = [m for m in methods if m.path is not None]
    # One entry per row: (label, infrared file, visible file, {method name: fused file}).
    pairs: list[tuple[str, Path, Path, dict[str, Path]]]
    if ir.is_file() or vi.is_file():
        if images:
            raise EvaluationError("--image selects pairs in folders; with --ir/--vi files leave it out")
        for role, p in [("infrared", ir), ("visible", vi)] + [(f"fused {m.name!r}", m.path) for m in folder_methods]:
            if not p.is_file():
                raise EvaluationError(
                    f"{role} {p} is not a file (with a file --ir, --vi and --fused must be files too)"
                )
        pairs = [(ir.stem, ir, vi, {m.name: m.path for m in folder_methods})]
    else:
        if not images:
            raise EvaluationError("with --ir/--vi folders, name the pairs to show with --image NAME (repeatable)")
        problems: list[str] = []
        sources = {"infrared": list_images(ir, "infrared", problems), "visible": list_images(vi, "visible", problems)}
        fused = {m.name: list_images(m.path, f"fused {m.name!r}", problems) for m in folder_methods}
        missing = [f"{s}: no {role} image" for s in images for role, found in sources.items() if s not in found]
        missing += [f"{s}: no image of {name!r}" for s in images for name, found in fused.items() if s not in found]
        if missing:
            raise EvaluationError("cannot build the grid:\n  " + "\n  ".join(missing + problems))
        pairs = [
            (s, sources["infrared"][s], sources["visible"][s], {name: found[s] for name, found in fused.items()})
            for s in images
        ]
    rows = []
    for _, ir_path, vi_path, fused_paths in pairs:
        row = [_open(ir_path, "L"), _open(vi_path, "RGB")]
        for m in methods:
            if m.baseline is not None:
                row.append(Image.fromarray(baseline_image(m.baseline, ir_path, vi_path), "L"))
            else:
                row.append(_open(fused_paths[m.name]))
        rows.append(row)
    titles = ["Infrared", "Visible"] + [m.name for m in methods]
    return make_grid(rows, titles, row_labels=[p[0] for p in pairs], zoom=zoom, panel_width=panel_width)
