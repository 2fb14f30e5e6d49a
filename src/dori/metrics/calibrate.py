"""Calibration of the pixel-ssim replication threshold on data that cannot be replicated.

Two null distributions, both without any possible replication:
1. photo pairs: SSIM between every pair of distinct reference photos of the tiny prompt set (memorized,
   seen-once, held-out photos and LFW images) at 32 x 32;
2. model vs held-out: SSIM between every generation of the tiny prompt set (calibration seeds, not
   the demo's) and every held-out photo, which the model never saw.
A null score at or below its reference's distractor score is rejected by that rule whatever the global
threshold (:meth:`PixelSSIM.distractor_score`); the global threshold must lie above every other one.
:data:`dori.metrics.pixel.PIXEL_SSIM_THRESHOLD` is their maximum rounded up to the next 0.05 plus 0.05
of margin, as documented in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dori.data.prompts import load_reference
from dori.data.tiny import tiny_prompt_set
from dori.metrics.pixel import PIXEL_SSIM_THRESHOLD, PixelSSIM
from dori.zoo.tiny_data import TinyDataSpec


def photo_pair_null(spec: TinyDataSpec | None = None) -> torch.Tensor:
    """Off-diagonal SSIMs between all distinct reference photos of the tiny prompt set (the images the
    metric is used against). Note: very smooth or identically aligned 25 px LFW images reach SSIM 0.75
    with each other, hence the distractor rule."""
    refs = [r for r in tiny_prompt_set(spec) if r.reference_status == "ok"]
    x = torch.stack([load_reference(r) for r in refs])
    sims = PixelSSIM().pairwise(x, x)
    return sims[~torch.eye(len(x), dtype=torch.bool)]


def model_heldout_null(pipe, seeds: Sequence[int],
                       metric: PixelSSIM | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every generation of the tiny prompt set against every held-out photo (``N x H``), and the
    held-out photos' distractor scores (``H``)."""
    from dori.models.generate import generate

    records = tiny_prompt_set()
    held = torch.stack([load_reference(r) for r in records if r.kind == "held_out"])
    out = generate(pipe, [r.caption for r in records], seeds=seeds)
    metric = metric or PixelSSIM()
    return metric.pairwise(out.images, held), torch.tensor([metric.distractor_score(h) for h in held])


def calibrate_pixel_threshold(model: str = "tiny", seeds: Sequence[int] = (100, 101, 102, 103)) -> dict:
    from dori.models.loading import load_pipeline

    metric = PixelSSIM()
    pairs = photo_pair_null()
    gens, held_distractors = model_heldout_null(load_pipeline(model), seeds, metric)  # one distractor cache
    left = gens[gens > held_distractors[None]]  # the scores the distractor rule does not already reject
    worst = float(max(pairs.max(), left.max() if left.numel() else 0.0))
    refs = [r for r in tiny_prompt_set() if r.reference_status == "ok"]
    distractors = {f"{r.kind}: {r.caption[:40]}": round(metric.distractor_score(load_reference(r)), 3) for r in refs}
    return {
        "distractor_scores": dict(sorted(distractors.items(), key=lambda kv: -kv[1])),
        "photo_pairs": {"n": pairs.numel(), "max": float(pairs.max()), "p99": float(pairs.quantile(0.99))},
        "generations_vs_held_out": {"n": gens.numel(), "max": float(gens.max()),
                                    "p99": float(gens.quantile(0.99)),
                                    "max_above_distractor_score": float(left.max()) if left.numel() else None},
        "suggested_threshold": round((int(worst * 20) + 1) / 20 + 0.05, 2),
        "pinned_threshold": PIXEL_SSIM_THRESHOLD,
    }
