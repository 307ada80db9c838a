"""A small log-log line plot drawn with Pillow, so the benchmark needs no matplotlib.

``line_plot(series, path, ...)`` where each series is a dict with ``label``, ``xs``,
``ys``, ``color`` (RGB tuple) and optionally ``dashed``.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

SIZE = (1000, 620)
LEFT, RIGHT, TOP, BOTTOM = 90, 250, 50, 70   # margins around the plotting area
GRID, AXIS, TEXT = (225, 225, 225), (40, 40, 40), (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # scalable font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks inside [lo, hi]; only powers of ten when the range spans many decades."""
    mantissas = (1,) if math.log10(hi / lo) > 3.5 else (1, 2, 5)
    ticks = []
    for exp in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10.0 ** exp for m in mantissas if lo <= m * 10.0 ** exp <= hi]
    return ticks


def _label(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


class _LogAxes:
    """Maps data to pixels on log-log axes padded a little beyond the data."""

    def __init__(self, xs, ys):
        self.x0, self.x1 = min(xs) / 1.15, max(xs) * 1.15
        self.y0, self.y1 = min(ys) / 1.6, max(ys) * 1.6
        self.left, self.right = LEFT, SIZE[0] - RIGHT
        self.top, self.bottom = TOP, SIZE[1] - BOTTOM

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = math.log(x / self.x0) / math.log(self.x1 / self.x0)
        fy = math.log(y / self.y0) / math.log(self.y1 / self.y0)
        return (self.left + fx * (self.right - self.left),
                self.bottom - fy * (self.bottom - self.top))


def _dashed(draw: ImageDraw.ImageDraw, points, color, width: int, dash=9, gap=6) -> None:
    """Pillow has no dash style: walk the polyline and draw every other stretch."""
    on, left = True, dash
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length, pos = math.hypot(xb - xa, yb - ya), 0.0
        while pos < length:
            step = min(left, length - pos)
            if on:
                t0, t1 = pos / length, (pos + step) / length
                draw.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0),
                           (xa + (xb - xa) * t1, ya + (yb - ya) * t1)], fill=color, width=width)
            pos, left = pos + step, left - step
            if left <= 0:
                on, left = not on, (dash if not on else gap)


def _draw_axes(img: Image.Image, ax: _LogAxes, xlabel: str, ylabel: str, font) -> None:
    draw = ImageDraw.Draw(img)
    for x in log_ticks(ax.x0, ax.x1):
        px, _ = ax.px(x, ax.y0)
        draw.line([(px, ax.top), (px, ax.bottom)], fill=GRID)
        draw.text((px, ax.bottom + 6), _label(x), fill=TEXT, font=font, anchor="mt")
    for y in log_ticks(ax.y0, ax.y1):
        _, py = ax.px(ax.x0, y)
        draw.line([(ax.left, py), (ax.right, py)], fill=GRID)
        draw.text((ax.left - 6, py), _label(y), fill=TEXT, font=font, anchor="rm")
    draw.rectangle([ax.left, ax.top, ax.right, ax.bottom], outline=AXIS, width=1)
    draw.text(((ax.left + ax.right) / 2, SIZE[1] - 22), xlabel, fill=TEXT, font=font,
              anchor="mm")
    # Vertical text: draw it on its own strip, rotate, paste.
    strip = Image.new("RGBA", (ax.bottom - ax.top, 24), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((strip.width / 2, 12), ylabel, fill=TEXT, font=font,
                               anchor="mm")
    rotated = strip.rotate(90, expand=True)
    img.paste(rotated, (14, ax.top), rotated)


def _draw_legend(draw: ImageDraw.ImageDraw, series, font) -> None:
    x, y = SIZE[0] - RIGHT + 20, TOP + 4
    for s in series:
        points = [(x, y + 8), (x + 40, y + 8)]
        if s.get("dashed"):
            _dashed(draw, points, s["color"], 3)
        else:
            draw.line(points, fill=s["color"], width=3)
        draw.text((x + 50, y + 8), s["label"], fill=TEXT, font=font, anchor="lm")
        y += 26


def line_plot(series: list[dict], path: str, title: str, xlabel: str, ylabel: str) -> None:
    """Write a PNG with one line (and markers) per non-empty series."""
    series = [s for s in series if s["xs"]]
    if not series:
        return
    img = Image.new("RGB", SIZE, "white")
    ax = _LogAxes([x for s in series for x in s["xs"]], [y for s in series for y in s["ys"]])
    font = _font(15)
    _draw_axes(img, ax, xlabel, ylabel, font)
    draw = ImageDraw.Draw(img)
    draw.text((SIZE[0] / 2, 22), title, fill=TEXT, font=_font(18), anchor="mm")
    for s in series:
        points = [ax.px(x, y) for x, y in zip(s["xs"], s["ys"])]
        if len(points) > 1:
            if s.get("dashed"):
                _dashed(draw, points, s["color"], 3)
            else:
                draw.line(points, fill=s["color"], width=3, joint="curve")
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=s["color"])
    _draw_legend(draw, series, font)
    img.save(path)
