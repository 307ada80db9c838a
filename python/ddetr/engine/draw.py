"""Drawing detections and attention sampling points on images (Pillow)."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw


def palette(k: int) -> tuple[int, int, int]:
    """A distinct bright colour for index ``k``."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _enlarged(image: Image.Image, min_side: int = 480) -> tuple[Image.Image, int]:
    """The image scaled up by an integer factor (nearest) until its longer side reaches
    ``min_side``, so small images stay legible; returns it and the factor."""
    k = max(1, min_side // max(image.size))
    return image.convert("RGB").resize((image.width * k, image.height * k),
                                       Image.Resampling.NEAREST), k


def draw_detections(image: Image.Image, boxes_xyxy, labels, scores, names: dict) -> Image.Image:
    """A copy of ``image`` (enlarged if small) with each box, its class name and score."""
    out, k = _enlarged(image)
    draw = ImageDraw.Draw(out)
    for box, label, score in zip(boxes_xyxy, labels, scores):
        colour = palette(int(label))
        box = [float(v) * k for v in box]
        draw.rectangle(box, outline=colour, width=2)
        text = f"{names.get(int(label), label)} {float(score):.2f}"
        x, y = box[0], max(box[1] - 11, 0)
        draw.rectangle(draw.textbbox((x, y), text), fill=(0, 0, 0))
        draw.text((x, y), text, fill=colour)
    return out


def draw_sampling_points(image: Image.Image, locations, weights, boxes_xyxy,
                         level_names) -> Image.Image:
    """One panel per feature level, side by side: for each query, its box and its
    sampling points on that level (all heads), the dot size growing with the weight.

    ``locations`` (Q, M, L, P, 2) normalised to the image, ``weights`` (Q, M, L, P),
    ``boxes_xyxy`` (Q, 4) in pixels of ``image`` (enlarged in the drawing if small)."""
    base, k = _enlarged(image, 320)
    w, h = base.size
    panels = Image.new("RGB", (w * len(level_names), h + 14))
    for lvl, name in enumerate(level_names):
        panel = base.copy()
        draw = ImageDraw.Draw(panel)
        for q in range(len(locations)):
            colour = palette(q)
            draw.rectangle([float(v) * k for v in boxes_xyxy[q]], outline=colour, width=1)
            points = locations[q, :, lvl].reshape(-1, 2).tolist()
            for (x, y), a in zip(points, weights[q, :, lvl].reshape(-1).tolist()):
                r = 1.0 + 6.0 * min(a * len(points) / 4, 1.0)
                draw.ellipse([x * w - r, y * h - r, x * w + r, y * h + r], outline=colour)
        panels.paste(panel, (lvl * w, 14))
        ImageDraw.Draw(panels).text((lvl * w + 2, 1), name, fill=(255, 255, 255))
    return panels
