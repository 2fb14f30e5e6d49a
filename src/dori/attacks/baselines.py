"""Baselines for the bypass benchmark, under DoRI's interface (``attack(pipe, images, prompts, ...)``
returning an :class:`~dori.attacks.dori.AttackResult`), so that every row of the table is produced the
same way:

- :class:`UnchangedPrompt`: the memorized prompt itself (DoRI at step 0);
- :class:`RandomPerturbation`: the prompt embedding plus Gaussian noise whose norm equals a given
  budget, per target (the benchmark passes DoRI's own ``||y - y0||``): does *any* move of that size
  re-trigger, or only DoRI's direction?
- :class:`TokenPerturbation`: a discrete baseline, prompts with words dropped, swapped or replaced by
  random vocabulary words (the kind of paraphrase a user could type).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch

from dori.attacks.dori import AttackResult
from dori.models.generate import encode_prompts


def _result(name: str, y0: torch.Tensor, trigger: torch.Tensor, idx: list[int], t0: float, **params) -> AttackResult:
    dist = (trigger - y0).flatten(1).norm(dim=1).tolist()
    return AttackResult(trigger=trigger, init=y0, target_index=idx, distance=[dist], steps=0,
                        seconds=time.time() - t0, params={"baseline": name, **params},
                        snapshots={0: trigger}, stopped_at=[None] * len(idx))


class UnchangedPrompt:
    """The original prompt's embedding, unchanged."""

    name = "prompt"

    def attack(self, pipe, images: torch.Tensor, prompts: Sequence[str], seed: int = 0) -> AttackResult:
        t0 = time.time()
        y0 = encode_prompts(pipe, prompts)
        return _result(self.name, y0, y0.clone(), list(range(len(prompts))), t0)


class RandomPerturbation:
    """``y0 + delta`` with ``delta ~ N(0, I)`` rescaled so that ``||delta||_2`` equals the target's norm.

    Args:
        samples: independent perturbations per target (target-major, like DoRI's restarts).
    """

    name = "random"

    def __init__(self, samples: int = 1):
        self.samples = samples

    def attack(self, pipe, images: torch.Tensor, prompts: Sequence[str], norms: Sequence[float],
               seed: int = 0) -> AttackResult:
        if len(norms) != len(prompts):
            raise ValueError("RandomPerturbation needs one norm per prompt")
        t0 = time.time()
        idx = [i for i in range(len(prompts)) for _ in range(self.samples)]
        y0 = encode_prompts(pipe, prompts)[idx]
        g = torch.Generator().manual_seed(seed)
        delta = torch.randn(y0.shape, generator=g).to(y0)
        scale = torch.tensor([float(norms[i]) for i in idx]).to(y0) / delta.flatten(1).norm(dim=1)
        return _result(self.name, y0, y0 + delta * scale.view(-1, 1, 1), idx, t0, samples=self.samples)


class TokenPerturbation:
    """Word-level perturbations of the prompt: each word is dropped, replaced by a random vocabulary
    word, or swapped with its neighbour, each with probability ``p``; ``variants`` prompts per target,
    each different from the prompt (redrawn up to 100 times)."""

    name = "tokens"

    def __init__(self, variants: int = 4, p: float = 0.15):
        self.variants, self.p = variants, p

    def perturb(self, caption: str, rng: random.Random, vocab: Sequence[str]) -> str:
        words = caption.split()
        out = []
        for w in words:
            r = rng.random()
            if r < self.p:
                continue  # drop
            out.append(rng.choice(vocab) if r < 2 * self.p else w)
        for i in range(len(out) - 1):
            if rng.random() < self.p:
                out[i], out[i + 1] = out[i + 1], out[i]
        return " ".join(out) or caption

    def _changed(self, caption: str, rng: random.Random, vocab: Sequence[str]) -> str:
        for _ in range(100):
            text = self.perturb(caption, rng, vocab)
            if text != caption:
                return text
        return text

    def attack(self, pipe, images: torch.Tensor, prompts: Sequence[str], seed: int = 0) -> AttackResult:
        t0 = time.time()
        rng = random.Random(seed)
        vocab = sorted(w[:-4] for w in pipe.tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isalpha())
        idx = [i for i in range(len(prompts)) for _ in range(self.variants)]
        texts = [self._changed(prompts[i], rng, vocab) for i in idx]
        y0 = encode_prompts(pipe, prompts)[idx]
        return _result(self.name, y0, encode_prompts(pipe, texts), idx, t0, variants=self.variants, p=self.p,
                       prompts=texts)


BASELINES = {c.name: c for c in (UnchangedPrompt, RandomPerturbation, TokenPerturbation)}
