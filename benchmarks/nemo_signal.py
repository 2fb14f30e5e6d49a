"""What NeMo's memorization signal is made of on a model, and whether its threshold can be reached.

    python benchmarks/nemo_signal.py [--per-kind 3] [--model tiny|DIR]

On the embedded tiny model (its prompt set, pixel-ssim and its sampling defaults for the MR columns).

NeMo judges a neuron selection by SSIM(delta_vanilla, delta_blocked), delta = eps(x_T, prompt) - x_T at
the first step (per-channel min-max scaled), and accepts it below its threshold (0.428 on SD v1.4).
Printed per caption (seeds 1-8):

- |eps_c - x_T| and |eps_c - eps_u|: the whole first-step difference and its text-conditional part;
- text-free SSIM: SSIM(delta(prompt), delta(empty prompt)) at the same seed, the similarity that no
  deactivation of text-path neurons can remove;
- pairwise: NeMo's detection signal (max SSIM between seeds);
- for memorized captions, the signal with every neuron of a layer group deactivated (the floor of
  NeMo's search) for the groups ``nemo-value`` and ``value``, and the MR (seeds 0-3, the model's
  guidance) with that whole group deactivated.

Then, per memorized caption, why: the UNet's error at the first step. ``x_t`` is made from the
memorized photo itself, so the exact noise is known: |eps_pred - eps| (the model's error, present
with or without text) against sqrt(abar / (1 - abar)) * |x0 - mean(x0)| (the photo's share of an exact
first-step difference), each also for its fine-scale part (minus a Gaussian blur, sigma 1.5 pixels).
"""

import argparse

import torch

from dori import load_pipeline, load_prompt_set
from dori.data.prompts import load_reference
from dori.metrics.pixel import PixelSSIM
from dori.mitigations.masks import Mask, apply_mask
from dori.mitigations.nemo import NeMo, _max_pairwise, _minmax, _ssim
from dori.models.generate import encode_prompts, generate, initial_noise, to_epsilon
from dori.models.layers import resolve_layers

KINDS = ("memorized", "seen_once", "held_out", "procedural")


def whole_group(pipe, group: str) -> Mask:
    return Mask("neuron", {r.name: torch.arange(r.module.out_features) for r in resolve_layers(pipe.unet, group)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-kind", type=int, default=3)
    ap.add_argument("--model", default="tiny", help="a tiny-model folder, e.g. one from `dori zoo train-tiny`")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    seeds = list(range(1, 9))
    x = initial_noise(pipe, seeds)

    def first_step(prompt: str):
        eps_u, eps_c = generate(pipe, [prompt], seeds=seeds, guidance_scale=2.0, stop_after=1,
                                return_noise_preds=True).noise_preds[0]
        return eps_u, eps_c

    eps_empty = first_step("")[1]
    free = _minmax(eps_empty - x)
    groups = ("nemo-value", "value")
    print(f"{'kind':11} {'caption':34} |eps_c-x_T| |eps_c-eps_u| text-free pairwise "
          + " ".join(f"floor:{g} MR:{g}" for g in groups))
    metric = PixelSSIM()
    for kind in KINDS:
        for rec in [r for r in load_prompt_set("tiny") if r.kind == kind][: args.per_kind]:
            eps_u, eps_c = first_step(rec.caption)
            delta = _minmax(eps_c - x)
            line = (f"{kind:11} {rec.caption[:34]:34} {(eps_c - x).flatten(1).norm(dim=1).mean():11.2f} "
                    f"{(eps_c - eps_u).flatten(1).norm(dim=1).mean():13.2f} {_ssim(delta, free).mean():9.2f} "
                    f"{_max_pairwise(delta).max():8.2f}")
            if kind == "memorized":
                for g in groups:
                    nemo = NeMo(layer_group=g, n_seeds=len(seeds), seed=seeds[0])
                    e = encode_prompts(pipe, [rec.caption])
                    floor = nemo.signal_floor(pipe, e, nemo.noise_diffs(pipe, e, seeds)[0], seeds)
                    with apply_mask(pipe, whole_group(pipe, g)):
                        imgs = generate(pipe, [rec.caption], seeds=[0, 1, 2, 3]).images
                    mr = float((metric.score(imgs, load_reference(rec)) > metric.threshold).float().mean())
                    line += f" {floor:16.2f} {mr:{len(g) + 3}.2f}"
            print(line, flush=True)

    sched = pipe.scheduler
    sched.set_timesteps(pipe.dori_defaults.num_inference_steps)
    t = sched.timesteps[0]
    abar = sched.alphas_cumprod[int(t)]
    print(f"\nfirst step t={int(t)}: the model's noise-prediction error vs the memorized photo's share")
    print(f"{'caption':34} |eps_pred - eps| (fine) sqrt(abar/(1-abar))*|x0 - mean| (fine)")
    g = torch.Generator().manual_seed(0)
    for rec in [r for r in load_prompt_set("tiny") if r.memorized]:
        x0 = (load_reference(rec)[None] * 2 - 1) * pipe.vae.config.scaling_factor  # pixel latents
        eps = torch.randn((len(seeds), *x0.shape[1:]), generator=g)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        cond = encode_prompts(pipe, [rec.caption]).expand(len(seeds), -1, -1)
        with torch.no_grad():
            pred = to_epsilon(sched, pipe.unet(x_t, t, encoder_hidden_states=cond).sample, x_t, t)
        err, share = pred - eps, (abar / (1 - abar)).sqrt() * (x0 - x0.mean())
        print(f"{rec.caption[:34]:34} {norm(err):15.2f} {norm(fine(err)):6.2f} {norm(share):30.2f} "
              f"{norm(fine(share)):6.2f}", flush=True)


def norm(x: torch.Tensor) -> float:
    return x.flatten(1).norm(dim=1).mean().item()


def fine(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """The fine-scale part: ``x`` minus its Gaussian blur (the structure SSIM's local windows compare)."""
    r = torch.arange(5, dtype=torch.float32) - 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w = (g[:, None] * g[None] / g.sum() ** 2).expand(x.shape[1], 1, 5, 5)
    return x - torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect"), w,
                                          groups=x.shape[1])


if __name__ == "__main__":
    main()
