"""How much of a procedural caption the tiny model uses: colour and shape, in the loss and in samples.

    python benchmarks/procedural_conditioning.py [--model tiny|DIR] [--guidance 2] [--guidance-rescale 0.5]
        [--n-seeds 4]

1. The programmatic check (`dori.metrics.procedural.check_procedural`) on freshly rendered training-like
   images: its accuracy on ground truth, so that a low score below is the model's, not the check's.
2. The denoising loss on 96 fresh procedural images (the recipe's renderer, unseen draws) at several
   timesteps, with the true caption, with the colour or the shape swapped, and with the empty caption.
   "colour share" is the part of the caption's gain (empty -> true) lost by a wrong colour; likewise for
   the shape. A share near 0 means the model ignores that word.
3. Generation at each guidance scale: the prompt set's procedural captions (named colour, named shape,
   both) and, for the trade-off, the memorized captions' MR (pixel-ssim).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dori import load_pipeline, load_prompt_set
from dori.data.prompts import load_reference
from dori.metrics.pixel import PixelSSIM
from dori.metrics.procedural import caption_blind_shape_score, check_procedural, foreground
from dori.models.generate import encode_prompts, generate, predict_noise, training_target
from dori.models.loading import TINY_PATH
from dori.zoo.tiny_data import COLORS, SHAPES, procedural_caption, procedural_items, render_procedural


def model_layout(model: str) -> str:
    """The procedural layout the model was trained on (its dori_recipe.json), so fresh images match it."""
    folder = TINY_PATH if model == "tiny" else Path(model)
    recipe = folder / "dori_recipe.json"
    if not recipe.exists():
        return "anywhere"
    return json.loads(recipe.read_text()).get("data", {}).get("procedural_layout", "anywhere")


def fresh_items(n: int, seed: int, layout: str):
    rng = np.random.default_rng(seed)
    items = procedural_items(n, seed)
    images = torch.stack([render_procedural(p["color"], p["shape"], p["background"], rng, layout)
                          for _, p in items])
    return items, images


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable, 7 taps, edges replicated) of ``N x 3 x H x W`` images."""
    if sigma == 0:
        return images
    k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(images, (3, 3, 0, 0), mode="replicate"), k.view(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(3, 1, 7, 1), groups=3)


def fill_ratio_shape(image: torch.Tensor) -> str | None:
    """The check's shape rule until 2026-12-01, for comparison: the foreground's bounding-box fill."""
    mask = foreground(image)[1]
    if mask.sum() < 12:
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    fill = float(mask.sum()) / ((int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1))
    return min({"square": 1.0, "circle": 0.785, "triangle": 0.5}.items(), key=lambda kv: abs(kv[1] - fill))[0]


def check_accuracy(layout: str, n: int = 600) -> None:
    items, images = fresh_items(n, 11, layout)
    print(f"check on {n} rendered training-like images ({layout} layout), blurred to mimic soft generations:")
    print("  blur sigma (px)  colour  shape  shape by the old fill-ratio rule")
    for sigma in (0.0, 1.0, 1.5, 2.0):
        imgs = blur(images, sigma)
        found = [check_procedural(img, p["color"], p["shape"]) for img, (_, p) in zip(imgs, items, strict=True)]
        old = sum(fill_ratio_shape(img) == p["shape"] for img, (_, p) in zip(imgs, items, strict=True))
        print(f"  {sigma:>15.1f}  {sum(f['color_ok'] for f in found) / n:>6.2f}  "
              f"{sum(f['shape_ok'] for f in found) / n:>5.2f}  {old / n:>5.2f}")


@torch.no_grad()
def caption_losses(pipe, layout: str, n: int = 96, timesteps=(100, 300, 500, 700, 900)) -> None:
    items, images = fresh_items(n, 77, layout)
    # the tiny model's VAE slot is the identity: latents are pixels in [-1, 1] times its scaling factor
    x0 = (images * 2 - 1) * pipe.vae.config.scaling_factor
    colors = list(COLORS)
    variants = {
        "true": [c for c, _ in items],
        "wrong colour": [procedural_caption(colors[(colors.index(p["color"]) + 3) % len(colors)], p["shape"])
                         for _, p in items],
        "wrong shape": [procedural_caption(p["color"], SHAPES[(SHAPES.index(p["shape"]) + 1) % len(SHAPES)])
                        for _, p in items],
        "empty": [""] * n,
    }
    embeds = {k: encode_prompts(pipe, v) for k, v in variants.items()}
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    print(f"denoising loss on {n} fresh procedural images (MSE of the model's {sched.config.prediction_type} target)")
    print(f"{'t':>5} " + " ".join(f"{k:>13}" for k in variants) + "  colour share  shape share")
    for t0 in timesteps:
        t = torch.full((n,), t0)
        noise = torch.randn(x0.shape, generator=g)
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = training_target(sched, x0, noise, t)
        dev = pipe.unet.device
        loss = {k: float(((predict_noise(pipe, xt.to(dev), t.to(dev), e).cpu() - target) ** 2).mean())
                for k, e in embeds.items()}
        gain = loss["empty"] - loss["true"]
        share = {k: (loss[k] - loss["true"]) / gain if gain > 0 else float("nan")
                 for k in ("wrong colour", "wrong shape")}
        print(f"{t0:>5} " + " ".join(f"{v:>13.4f}" for v in loss.values())
              + f"  {share['wrong colour']:>12.2f}  {share['wrong shape']:>11.2f}")


def generation_checks(pipe, guidance: list[float], seeds: list[int], rescale: float | None = None) -> None:
    recs = [r for r in load_prompt_set("tiny") if r.kind in ("procedural", "memorized")]
    metric = PixelSSIM()
    rescale = pipe.dori_defaults.guidance_rescale if rescale is None else rescale
    print(f"generation, seeds {seeds}, the model's sampling steps, guidance rescale {rescale} (where guidance > 1)")
    print(f"{'guidance':>8}  colour  shape   both  memorized MR")
    for gs in guidance:
        out = generate(pipe, [r.caption for r in recs], seeds=seeds, guidance_scale=gs, guidance_rescale=rescale,
                       batch_size=32)
        found, named, hits = [], [], []
        for j, p in enumerate(out.prompt_index):
            r = recs[p]
            if r.kind == "procedural":
                found.append(check_procedural(out.images[j], **r.meta))
                named.append(r.meta["shape"])
            else:
                ref = load_reference(r)
                hits.append(bool(metric.replicated(metric.score(out.images[j : j + 1], ref), ref)[0]))
        rate = {k: sum(f[k] for f in found) / len(found) for k in ("color_ok", "shape_ok", "ok")}
        print(f"{gs:>8.1f}  {rate['color_ok']:>6.2f}  {rate['shape_ok']:>5.2f}  {rate['ok']:>5.2f}  "
              f"{sum(hits) / len(hits):>12.2f}")
        shape_confusion([f["shape"] for f in found], named)


def shape_confusion(drawn: list[str | None], named: list[str]) -> None:
    """Which shape is drawn for each named one, and the shape score a caption-blind model would get with
    the same drawn shapes (sum over shapes of named share x drawn share): above it, the shape word acts."""
    blind = caption_blind_shape_score(drawn, named)
    print(f"          drawn shape per named shape (none: no foreground); caption-blind score {blind:.2f}")
    for s in SHAPES:
        got = [d for d, w in zip(drawn, named, strict=True) if w == s]
        print(f"          {s:>8}: " + ", ".join(f"{d} {got.count(d)}" for d in (*SHAPES, None)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guidance", default=None, help="comma-separated; default: the model's")
    ap.add_argument("--guidance-rescale", type=float, default=None, help="default: the model's")
    ap.add_argument("--n-seeds", type=int, default=4, help="seeds 0 .. N-1")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model, device=args.device)
    layout = model_layout(args.model)
    check_accuracy(layout)
    caption_losses(pipe, layout)
    guidance = ([float(g) for g in args.guidance.split(",")] if args.guidance
                else [pipe.dori_defaults.guidance_scale])
    generation_checks(pipe, guidance, list(range(args.n_seeds)), args.guidance_rescale)


if __name__ == "__main__":
    main()
