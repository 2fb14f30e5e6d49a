"""Saving images of a run as PNG files."""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dori.reports.results import write_atomic


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe, unique-enough name for a caption."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len]
    return f"{s}-{zlib.crc32(text.encode()):08x}"


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Save ``3 x H x W`` in [0, 1] as an 8-bit PNG (atomically)."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
