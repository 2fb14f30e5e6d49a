"""The pixel protocol ``pixel-ssim``: SSIM at the model's resolution, for models without SSCD.

Protocol (pinned): both images are brought to the generated image's resolution (references: centre
square crop, then area resize, as the tiny model's training data), RGB in [0, 1]; SSIM with a
Gaussian window (sigma 1.5, 7x7), ``data_range=1``, population covariance, averaged over pixels and
channels (``skimage.metrics.structural_similarity``). Replicated when SSIM is above both
:data:`PIXEL_SSIM_THRESHOLD` and the reference's *distractor score*.

The threshold is calibrated, not chosen: ``dori zoo calibrate-pixel`` measures the largest SSIM that
occurs without replication (every generation of the tiny prompt set against every held-out photo it
cannot have memorized, and every pair of distinct bundled photos) and rounds it up; docs/metrics.md
records the numbers. It is not SSCD's 0.7 and is never mixed with SSCD scores.

The distractor score of a reference is the highest SSIM that any *other* real image of a pinned pool
reaches against it (the 200 images of ``skimage.data.lfw_subset`` and the tiny model's bundled photos;
images at SSIM >= 0.98, i.e. the reference itself, excluded). A generation that is no closer to the
reference than a different photo is not a copy of it: smooth grayscale faces and patches reach
SSIM 0.56-0.90 with distinct LFW images, above the global threshold, while the memorized photos'
distractor scores are 0.17-0.45 (docs/metrics.md).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import numpy as np
import scipy
import skimage
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from dori.metrics.base import ReplicationMetric
from dori.reports.results import ItemStore, cache_dir, tensor_digest, write_json

log = logging.getLogger(__name__)

PIXEL_SSIM_THRESHOLD = 0.5  # see docs/metrics.md, "pixel-ssim calibration"
# the protocol's SSIM: Gaussian window (sigma 1.5), population covariance
_SSIM_KW = dict(channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
SAME_IMAGE_SSIM = 0.98  # pool images at least this close to a reference are the reference itself


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
        distractors: also require the score to beat the reference's distractor score (the protocol;
            False only to reproduce numbers of the global threshold alone).

    Example:
        >>> m = PixelSSIM()
        >>> x = torch.rand(2, 3, 32, 32)
        >>> m.score(x, x[0])[0].item()  # identical images
        1.0
    """

    name = "pixel-ssim"
    version = 2  # 2: the distractor score joined the rule

    def __init__(self, threshold: float = PIXEL_SSIM_THRESHOLD, distractors: bool = True):
        self.threshold, self.distractors = threshold, distractors

    def distractor_score(self, reference: torch.Tensor, size: int = 32) -> float:
        """Highest SSIM that another image of the pool reaches against ``reference`` at ``size``.

        About 0.5 s per reference on a CPU core, so each score is kept in dori's cache
        (``$DORI_CACHE/pixel_ssim_distractors.json``), keyed by the digests of the resized reference and of
        the pool, the versions of scikit-image and scipy (its filters), the SSIM settings, the same-image
        bound and the metric's version."""
        ref = resize_square(reference.detach().float().cpu(), size)
        key = ItemStore.key(_pool_digest(size), tensor_digest(ref), skimage.__version__, scipy.__version__, _SSIM_KW,
                            SAME_IMAGE_SSIM, self.version)
        known = _known_distractor_scores()
        if key not in known:
            s = self.pairwise(_distractor_pool(size), [ref])[:, 0]
            known[key] = float(s[s < SAME_IMAGE_SSIM].max())
            _store_distractor_scores(known)
        return known[key]

    def threshold_for(self, reference: torch.Tensor, size: int = 32) -> float:
        if not self.distractors:
            return self.threshold
        return max(self.threshold, self.distractor_score(reference, size))

    def pairwise(self, generated: torch.Tensor, references: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        size = generated.shape[-1]
        refs = torch.stack([resize_square(r, size) for r in references])
        g = generated.detach().float().clamp(0, 1).cpu().numpy()
        r = refs.detach().float().clamp(0, 1).cpu().numpy()
        out = np.empty((len(g), len(r)), dtype=np.float64)
        for i in range(len(g)):
            for j in range(len(r)):
                out[i, j] = structural_similarity(g[i], r[j], **_SSIM_KW)
        return torch.from_numpy(out).float()


_DISTRACTOR_SCORES: dict[str, float] = {}  # this process's, and those read from the cache file once
_DISTRACTORS_FILE = "pixel_ssim_distractors.json"
_UNWRITABLE: list[str] = []  # the write errors already warned about (each once)


def _stored_distractor_scores() -> dict[str, float]:
    """The cache file's scores that can be SSIM distractor scores; nothing when it is missing or unreadable
    (the scores are then computed again)."""
    try:
        stored = json.loads((cache_dir() / _DISTRACTORS_FILE).read_text())
        items = [(str(k), float(v)) for k, v in stored.items()]
    except (OSError, RuntimeError, ValueError, TypeError, AttributeError):  # RuntimeError: no home folder
        return {}
    return {k: v for k, v in items if -1.0 <= v < SAME_IMAGE_SSIM}  # NaN and infinities fail this too


def _known_distractor_scores() -> dict[str, float]:
    if not _DISTRACTOR_SCORES:
        _DISTRACTOR_SCORES.update(_stored_distractor_scores())
    return _DISTRACTOR_SCORES


def _store_distractor_scores(known: dict[str, float]) -> None:
    try:
        path = cache_dir() / _DISTRACTORS_FILE
        write_json(path, _stored_distractor_scores() | known)  # keeps what other processes stored meanwhile
    except (OSError, RuntimeError) as e:  # the scores are computed again next time; nothing else changes
        if str(e) not in _UNWRITABLE:
            _UNWRITABLE.append(str(e))
            log.warning("could not write dori's cache (%s); set DORI_CACHE to a writable folder", e)


@lru_cache(maxsize=2)
def _pool_digest(size: int) -> str:
    return tensor_digest(_distractor_pool(size))


@lru_cache(maxsize=2)
def _distractor_pool(size: int) -> torch.Tensor:
    from dori.zoo.tiny_data import PHOTO_CAPTIONS, load_lfw, load_photo

    return torch.stack([load_lfw(i, size) for i in range(200)] + [load_photo(n, size) for n in PHOTO_CAPTIONS])
