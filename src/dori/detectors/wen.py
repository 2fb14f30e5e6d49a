"""Text-conditional noise magnitude (Wen et al., "Detecting, Explaining, and Mitigating Memorization
in Diffusion Models", ICLR 2024).

A memorized prompt pulls the noise prediction far from the unconditional one from the very first
denoising steps. The score of a prompt is ``|| eps(x_t, e_prompt) - eps(x_t, e_empty) ||_2`` (over all
latent elements), averaged over the first ``n_steps`` sampling steps and over ``seeds``. Memorized
prompts score far higher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dori.models.generate import generate


class NoiseMagnitude:
    """Wen et al.'s detector. One verb: :meth:`score`.

    Args:
        n_steps: how many of the first sampling steps to average (Wen et al. report the first step
            alone already separates on SD; more steps are more robust on small models).
        seeds: initial noises to average over.
        num_inference_steps: the sampling schedule the first steps are taken from (default: the model's).

    Example:
        >>> det = NoiseMagnitude()
        >>> det.score(pipe, ["chelsea the orange tabby cat looking up", "a red circle on a blue background"])
        tensor([..., ...])
    """

    name = "noise-magnitude"

    def __init__(self, n_steps: int = 10, seeds: Sequence[int] = (0, 1, 2, 3),
                 num_inference_steps: int | None = None):
        if n_steps < 1:
            raise ValueError("n_steps must be >= 1")
        self.n_steps, self.seeds, self.num_inference_steps = n_steps, tuple(seeds), num_inference_steps

    @torch.no_grad()
    def score(self, pipe, prompts: Sequence[str] | None = None, *, prompt_embeds: torch.Tensor | None = None,
              batch_size: int = 32) -> torch.Tensor:
        """One score per prompt (higher = more likely memorized)."""
        out = generate(pipe, prompts, prompt_embeds=prompt_embeds, seeds=self.seeds, stop_after=self.n_steps,
                       num_inference_steps=self.num_inference_steps, return_noise_preds=True,
                       with_uncond=True, batch_size=batch_size)
        mags = step_magnitudes(out.noise_preds).mean(0)
        n_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        return mags.view(n_prompts, len(self.seeds)).mean(1).float().cpu()

    def __repr__(self) -> str:
        return f"NoiseMagnitude(n_steps={self.n_steps}, seeds={self.seeds})"


def step_magnitudes(noise_preds) -> torch.Tensor:
    """``steps x N`` text-conditional noise magnitudes ``||eps_cond - eps_uncond||`` from ``generate``'s
    ``noise_preds`` (one ``2 x N x C x h x w`` tensor, uncond then cond, per step)."""
    return torch.stack([(p[1] - p[0]).flatten(1).norm(dim=1) for p in noise_preds])


def detection_metrics(scores: Sequence[float], labels: Sequence[bool]) -> dict:
    """AUROC and TPR at 1% FPR of scores against memorized (True) / not (False) labels."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    if y.all() or not y.any():
        raise ValueError("detection metrics need both memorized and non-memorized prompts")
    fpr, tpr, thr = roc_curve(y, s)
    ok = fpr <= 0.01
    return {"auroc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": float(tpr[ok].max()) if ok.any() else 0.0,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
