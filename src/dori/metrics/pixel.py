"""The pixel protocol ``pixel-ssim``: SSIM at the model's resolution, for models without SSCD.

Protocol (pinned): both images are brought to the generated image's resolution (references: centre
square crop, then area resize, as the tiny model's training data), RGB in [0, 1]; SSIM with a
Gaussian window (sigma 1.5, 7x7), ``data_range=1``, population covariance, averaged over pixels and
channels (``skimage.metrics.structural_similarity``). Replicated when SSIM > :data:`PIXEL_SSIM_THRESHOLD`.

The threshold is calibrated, not chosen: ``dori zoo calibrate-pixel`` measures the largest SSIM that
occurs without replication (every generation of the tiny prompt set against every held-out photo it
cannot have memorized, and every pair of distinct bundled photos) and rounds it up; docs/metrics.md
records the numbers. It is not SSCD's 0.7 and is never mixed with SSCD scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from dori.metrics.base import ReplicationMetric

PIXEL_SSIM_THRESHOLD = 0.5  # see docs/metrics.md, "pixel-ssim calibration"


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """``* x 3 x H x W`` -> centre square crop -> area resize to ``size x size``."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = images[..., top : top + s, left : left + s]
    if s == size:
        return x
    return F.interpolate(x.reshape(-1, *x.shape[-3:]).float(), size=(size, size), mode="area").reshape(
        *x.shape[:-2], size, size)


class PixelSSIM(ReplicationMetric):
    """SSIM at the generated image's resolution (protocol ``pixel-ssim``).

    Args:
        threshold: replication threshold (default: the calibrated :data:`PIXEL_SSIM_THRESHOLD`).

    Example:
        >>> m = PixelSSIM()
        >>> x = torch.rand(2, 3, 32, 32)
        >>> m.score(x, x[0])[0].item()  # identical images
        1.0
    """

    name = "pixel-ssim"

    def __init__(self, threshold: float = PIXEL_SSIM_THRESHOLD):
        self.threshold = threshold

    def pairwise(self, generated: torch.Tensor, references: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        size = generated.shape[-1]
        refs = torch.stack([resize_square(r, size) for r in references])
        g = generated.detach().float().clamp(0, 1).cpu().numpy()
        r = refs.detach().float().clamp(0, 1).cpu().numpy()
        out = np.empty((len(g), len(r)), dtype=np.float64)
        for i in range(len(g)):
            for j in range(len(r)):
                out[i, j] = structural_similarity(g[i], r[j], channel_axis=0, data_range=1.0,
                                                  gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False)
        return torch.from_numpy(out).float()
