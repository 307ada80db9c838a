"""Training curves from a ``ddetr train`` log (``output_dir/log.jsonl``), drawn with
Pillow (no plotting library needed): the training loss per epoch, and the COCO AP, AP50
and AP_small of the epochs that were evaluated, side by side in one PNG."""

from __future__ import annotations

import json
import math
import os

from PIL import Image, ImageDraw

from ddetr.engine.evaluate import STAT_NAMES

# (panel title, log values drawn in it)
PANELS = (("training loss", ("train_loss",)), ("COCO bbox AP", ("AP", "AP50", "AP_small")))
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127))
INK, GRID = (0, 0, 0), (225, 225, 225)
# room around a panel's plot area for the title, the tick labels and the axis label
MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 56, 28, 16, 40


def read_log(path: str) -> list[dict]:
    """The records of a log, one per epoch, by epoch (a later record of an epoch
    replaces an earlier one: a second run in the same output_dir appends to the log)."""
    if not os.path.isfile(path):
        raise ValueError(f"log: {path!r} does not exist")
    by_epoch = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"log: {path} line {number} is not JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError(f"log: {path} line {number} has no 'epoch' (not a ddetr "
                                 f"train log)")
            by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise ValueError(f"log: {path} has no records")
    return [by_epoch[e] for e in sorted(by_epoch)]


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(epoch, value)]`` for every value of ``PANELS`` (finite values only)."""
    out = {name: [] for _, names in PANELS for name in names}
    for record in records:
        values = dict(record)
        values.update(zip(STAT_NAMES, record.get("coco_eval_bbox", [])))
        for name, points in out.items():
            value = values.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((record["epoch"], float(value)))
    return out


def plot_log(log_path: str, out_path: str, width: int = 960, height: int = 400) -> str:
    """Writes the curves of ``log_path`` to ``out_path`` (PNG, ``width`` x ``height``)."""
    if width < 200 * len(PANELS) or height < 150:
        raise ValueError(f"width, height: at least {200 * len(PANELS)} x 150 pixels, "
                         f"got {width} x {height}")
    data = curves(read_log(log_path))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    panel_width = width // len(PANELS)
    for i, (title, names) in enumerate(PANELS):
        box = (i * panel_width, 0, (i + 1) * panel_width, height)
        draw_panel(draw, box, title, {name: data[name] for name in names})
    image.save(out_path, format="PNG")
    return out_path


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or max(abs(lo) * 0.1, 0.5)
    return lo - pad, hi + pad


def draw_panel(draw: ImageDraw.ImageDraw, box, title: str, series: dict,
               xlabel: str = "epoch") -> None:
    """One line chart in ``box`` (x0, y0, x1, y1): axes with ticks (integers on x,
    labelled ``xlabel``), a line and dots per series, the legend in the title row,
    right-aligned."""
    left, top = box[0] + MARGIN_LEFT, box[1] + MARGIN_TOP
    right, bottom = box[2] - MARGIN_RIGHT, box[3] - MARGIN_BOTTOM
    draw.text((left, box[1] + 8), title, fill=INK)
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((left, (top + bottom) // 2), "nothing logged", fill=INK)
        return
    (x_lo, x_hi), (y_lo, y_hi) = _span([p[0] for p in points]), _span([p[1] for p in points])

    def to_pixels(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    _axes(draw, (left, top, right, bottom), (x_lo, x_hi), (y_lo, y_hi), to_pixels, xlabel)
    legend_x = right
    for k, (name, pts) in reversed(list(enumerate(series.items()))):
        colour = COLOURS[k % len(COLOURS)]
        xy = [to_pixels(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_x -= draw.textlength(name) + 12
        draw.text((legend_x, box[1] + 8), name, fill=colour)


def ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round values (multiples of 1, 2 or 5 x 10^k) in [lo, hi], about ``count``."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _axes(draw, area, x_range, y_range, to_pixels, xlabel: str) -> None:
    """Frame, grid lines and labels: round values on y, integers on x."""
    left, top, right, bottom = area
    draw.rectangle(area, outline=INK)
    for y in ticks(*y_range):
        py = to_pixels(x_range[0], y)[1]
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((left - 6, py), f"{y:.3g}", fill=INK, anchor="rm")
    first, last = math.ceil(x_range[0]), math.floor(x_range[1])
    step = max(1, math.ceil((last - first + 1) / 10))
    for epoch in range(first, last + 1, step):
        px = to_pixels(epoch, y_range[0])[0]
        draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
        draw.text((px, bottom + 6), str(epoch), fill=INK, anchor="mt")
    draw.text(((left + right) / 2, bottom + 22), xlabel, fill=INK, anchor="mt")
