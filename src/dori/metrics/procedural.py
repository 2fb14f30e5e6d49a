"""A programmatic check that a procedural image shows the named colour and shape (and background, if named).

Background colour: median of the border pixels. Foreground: pixels farther than 0.3 (RGB distance)
from it. The foreground and background colours are matched to the nearest named colour. The shape is
the one whose template fits the foreground best: each shape of the foreground's area, centred on its
centroid (a triangle's centroid lies a third of its half-size below its centre), within 1 px and 10% of
size, scored by intersection over union. Until 2026-12-01 the shape was read from the bounding box's
fill ratio (square ~1, circle ~0.79, triangle ~0.5), which reads blurred shapes as circles: on rendered
shapes blurred by a Gaussian of sigma 2 px it was right for 69%, the template fit for 96%
(`benchmarks/procedural_conditioning.py` prints both; docs/metrics.md).
"""

from __future__ import annotations

import math

import torch

from dori.zoo.tiny_data import COLORS, SHAPES, shape_mask

_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area over half-size squared (shape_mask)


def _nearest_color(rgb: torch.Tensor) -> str:
    names = list(COLORS)
    ref = torch.tensor([COLORS[n] for n in names])
    return names[int(((ref - rgb) ** 2).sum(1).argmin())]


def foreground(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The background colour (median of the border pixels) and the foreground mask (pixels farther than
    0.3 from it, RGB distance) of a ``3 x H x W`` image in [0, 1]."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    bg = border.median(dim=1).values
    return bg, ((image - bg.view(3, 1, 1)) ** 2).sum(0).sqrt() > 0.3


def check_procedural(image: torch.Tensor, color: str, shape: str, background: str | None = None) -> dict:
    """Check one ``3 x H x W`` image in [0, 1]. Returns the detected attributes and ``ok`` flags
    (``background_ok`` is None when no background is asked for; ``ok`` = every asked attribute right)."""
    img = image.detach().float().cpu()
    bg, fg_mask = foreground(img)
    n = int(fg_mask.sum())
    found = {"background": _nearest_color(bg), "color": None, "shape": None, "fg_pixels": n}
    if n >= 12:
        found["color"] = _nearest_color(img[:, fg_mask].median(dim=1).values)
        fit = shape_fit(fg_mask)
        found["shape_iou"] = {k: round(v, 3) for k, v in fit.items()}
        found["shape"] = max(fit, key=fit.get)
    found["color_ok"] = found["color"] == color
    found["shape_ok"] = found["shape"] == shape
    found["background_ok"] = None if background is None else found["background"] == background
    found["ok"] = found["color_ok"] and found["shape_ok"] and found["background_ok"] is not False
    return found


def caption_blind_shape_score(drawn: list[str | None], named: list[str]) -> float:
    """The shape score a model blind to the shape word would get with the same drawn shapes: the sum over
    shapes of (share of captions naming it) x (share of generations drawing it). Above it, the word acts."""
    n = len(named)
    return sum(named.count(s) / n * drawn.count(s) / n for s in SHAPES)


def shape_fit(mask: torch.Tensor) -> dict[str, float]:
    """The best intersection over union of each shape's template with a boolean ``H x W`` mask: the
    template has the mask's area and sits on its centroid, searched within 1 px and 10% of size."""
    n = int(mask.sum())
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cy, cx = float(ys.float().mean()) + 0.5, float(xs.float().mean()) + 0.5  # pixel centres, as shape_mask
    fit = {}
    for shape in SHAPES:
        r0, best = math.sqrt(n / _AREA[shape]), 0.0
        for r in (0.9 * r0, r0, 1.1 * r0):
            y0 = cy - (r / 3 if shape == "triangle" else 0.0)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    t = shape_mask(shape, cx + dx, y0 + dy, r, size=mask.shape[-1])
                    best = max(best, float((t & mask).sum()) / float((t | mask).sum()))
        fit[shape] = best
    return fit
