"""NeMo's seed-consistency detector (Hintersdorf et al., "Finding NeMo", NeurIPS 2024).

A memorized prompt makes the first denoising step point to the same image whatever the initial noise:
the scaled first-step noise differences ``eps(x_T, prompt) - x_T`` of different seeds look alike. The
score of a prompt is the largest SSIM between the differences of any two of ``n_seeds`` seeds; NeMo flags
a prompt above 0.428 on SD v1.4, a threshold calibrated on non-memorized prompts
(:func:`dori.mitigations.nemo.calibrate_nemo_threshold` calibrates it for another model). The signal is
computed by :mod:`dori.mitigations.nemo`, which uses it to pick the seeds its neuron search looks at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dori.mitigations.nemo import max_pairwise_ssim


class SeedConsistency:
    """NeMo's detector. One verb: :meth:`score`.

    Args:
        n_seeds, seed: initial noises ``seed .. seed + n_seeds - 1`` (NeMo: 10 seeds from 1).

    Example:
        >>> SeedConsistency().score(pipe, ["chelsea the orange tabby cat looking up"])
        tensor([...])
    """

    name = "seed-consistency"

    def __init__(self, n_seeds: int = 10, seed: int = 1):
        if n_seeds < 2:
            raise ValueError("seed consistency needs n_seeds >= 2 (it compares seeds pairwise)")
        self.seeds = tuple(range(seed, seed + n_seeds))

    def score(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        """One score per prompt (max pairwise SSIM; higher = more likely memorized)."""
        return max_pairwise_ssim(pipe, list(prompts), self.seeds).float().cpu()

    def __repr__(self) -> str:
        return f"SeedConsistency(seeds={self.seeds[0]}..{self.seeds[-1]})"
