"""Wen et al.'s noise magnitude per sampling step: which steps separate memorized captions.

    python benchmarks/detection_steps.py [--model tiny|DIR] [--seeds 0,1,2,3]

Generates every caption of the tiny prompt set once (the model's steps and guidance), keeps the
text-conditional noise difference ``||eps(x_t, prompt) - eps(x_t, "")||`` of every step (as eps, also
for v-prediction models), and prints the AUROC of memorized vs all other captions per step and for the
mean over the first k steps (`dori detect` uses the first 10).
"""

import argparse

import torch

from dori import load_pipeline, load_prompt_set
from dori.detectors.wen import detection_metrics, step_magnitudes
from dori.models.generate import generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seeds", default="0,1,2,3")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    recs = load_prompt_set("tiny")
    labels = [r.memorized for r in recs]
    out = generate(pipe, [r.caption for r in recs], seeds=seeds, return_noise_preds=True,
                   with_uncond=True, batch_size=32)
    mags = step_magnitudes(out.noise_preds).view(len(out.noise_preds), len(recs), len(seeds)).mean(2)  # steps x caps

    def auroc(scores: torch.Tensor) -> float:
        return detection_metrics(scores.tolist(), labels)["auroc"]

    print("AUROC per step:", " ".join(f"{auroc(m):.2f}" for m in mags))
    for k in (1, 3, 5, 10, len(mags)):
        print(f"mean over the first {k:2} steps: AUROC {auroc(mags[:k].mean(0)):.3f}")


if __name__ == "__main__":
    main()
