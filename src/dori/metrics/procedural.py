"""A programmatic check that a procedural image shows the named colour and shape (and background, if named).

Background colour: median of the border pixels. Foreground: pixels farther than 0.3 (RGB distance)
from it. The foreground and background colours are matched to the nearest named colour; the shape is
classified by how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

import torch

from dori.zoo.tiny_data import COLORS

_FILL = {"square": 1.0, "circle": 0.785, "triangle": 0.5}


def _nearest_color(rgb: torch.Tensor) -> str:
    names = list(COLORS)
    ref = torch.tensor([COLORS[n] for n in names])
    return names[int(((ref - rgb) ** 2).sum(1).argmin())]


def check_procedural(image: torch.Tensor, color: str, shape: str, background: str | None = None) -> dict:
    """Check one ``3 x H x W`` image in [0, 1]. Returns the detected attributes and ``ok`` flags
    (``background_ok`` is None when no background is asked for; ``ok`` = every asked attribute right)."""
    img = image.detach().float().cpu()
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
    bg = border.median(dim=1).values
    fg_mask = ((img - bg.view(3, 1, 1)) ** 2).sum(0).sqrt() > 0.3
    n = int(fg_mask.sum())
    found = {"background": _nearest_color(bg), "color": None, "shape": None, "fg_pixels": n}
    if n >= 12:
        found["color"] = _nearest_color(img[:, fg_mask].median(dim=1).values)
        ys, xs = torch.nonzero(fg_mask, as_tuple=True)
        box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
        fill = n / box
        found["fill"] = round(fill, 3)
        found["shape"] = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
    found["color_ok"] = found["color"] == color
    found["shape_ok"] = found["shape"] == shape
    found["background_ok"] = None if background is None else found["background"] == background
    found["ok"] = found["color_ok"] and found["shape_ok"] and found["background_ok"] is not False
    return found
