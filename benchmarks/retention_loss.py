"""The bypass seen through the training loss, with no replication threshold: how close does DoRI bring
each memorized image's loss back under a mitigation, and how close does it bring a non-memorized one's?

    python benchmarks/retention_loss.py [--method wanda|nemo] [-p wanda.sparsity=0.2] [--control N]

Every loss is the mean training loss (the model's target, v on the tiny model) of an image over the same
fixed (noise, timestep) pairs (t uniform over all timesteps, seed 123, ``--pairs``), divided by that
image's loss with the empty prompt on the same model: 1.00 means the embedding tells the model nothing
about the image, lower means it pulls the model towards it. Memorized photos: with their caption on the
plain model, with their caption under their own mask (localized here by the method at the model's
settings; ``-p`` overrides as in ``dori attack``), and with a DoRI trigger found under that mask (the
model's DoRI settings: 50 steps, 8 pairs, init from the caption; seed 0); "undone" is the share of the
mask's rise in the ratio that the trigger takes back, (masked - masked+DoRI) / (masked - plain). The
control (the bypass benchmark's: every seen-once and held-out photo, or the first ``--control N`` of
each kind) is attacked the same way on the plain model, in one batch (so each control trigger depends on
the batch); the memorized photos are attacked one at a time, each under its own mask. About 4 min for
Wanda, 5 min for NeMo (its statistics), on 2 cores. What the numbers say: docs/attacks.md ("The loss
view").
"""

import argparse

import torch

from dori import encode_prompts, load_pipeline, load_prompt_set
from dori.analyses.bypass import control_records
from dori.analyses.demo import make_attack, make_method
from dori.cli import _method_params
from dori.data.prompts import load_reference
from dori.mitigations.masks import apply_mask
from dori.models.generate import denoising_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("wanda", "nemo"), default="wanda")
    ap.add_argument("-p", "--param", action="append", help="METHOD.KEY=VALUE, e.g. wanda.sparsity=0.2")
    ap.add_argument("--control", type=int, help="control photos per kind (seen-once, held-out; default all)")
    ap.add_argument("--pairs", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline("tiny")
    records = load_prompt_set("tiny")
    params = _method_params(args.param)
    if set(params) - {args.method}:
        raise SystemExit(f"-p sets {sorted(set(params) - {args.method})} but --method is {args.method}")
    method = make_method(args.method, pipe, None, params.get(args.method))
    dori = make_attack(pipe)
    g = torch.Generator().manual_seed(123)
    size = pipe.unet.config.sample_size  # the tiny model's VAE is the identity: latents are pixels
    noise = torch.randn(args.pairs, pipe.unet.config.in_channels, size, size, generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (args.pairs,), generator=g)
    empty = encode_prompts(pipe, [""])[0]

    @torch.no_grad()
    def ratios(image: torch.Tensor, embeds: list[torch.Tensor]) -> list[float]:
        """Loss with each embedding over the loss with the empty prompt, on ``pipe`` as it is now."""
        clean = (image[None] * 2 - 1).expand(args.pairs, -1, -1, -1)
        loss = [denoising_loss(pipe, clean, noise, t, e[None].expand(args.pairs, -1, -1)).mean().item()
                for e in [empty, *embeds]]
        return [x / loss[0] for x in loss[1:]]

    print(f"method: {method!r}\nattack: {dori!r}\nloss / loss with the empty prompt, {args.pairs} (noise, t) pairs")
    print(f"{'memorized caption':46} {'plain':>6} {'masked':>6} {'masked+DoRI':>11} {'undone':>6}")
    for rec in (r for r in records if r.memorized):
        image, cap = load_reference(rec), encode_prompts(pipe, [rec.caption])[0]
        plain = ratios(image, [cap])[0]
        res = method.localize(pipe, rec.caption)
        with apply_mask(pipe, getattr(res, "mask", res)):  # NeMo returns a NeMoResult, Wanda a Mask
            trigger = dori.attack(pipe, image[None], prompts=[rec.caption]).trigger[0]
            masked, attacked = ratios(image, [cap, trigger])
        undone = (masked - attacked) / (masked - plain)  # share of the mask's rise that DoRI takes back
        print(f"{rec.caption[:46]:46} {plain:6.2f} {masked:6.2f} {attacked:11.2f} {undone:6.0%}")
    control = control_records(records, args.control)
    images = torch.stack([load_reference(r) for r in control])
    triggers = dori.attack(pipe, images, prompts=[r.caption for r in control]).trigger
    print(f"\n{'control caption (plain model)':46} {'kind':>9} {'caption':>7} {'+DoRI':>6}")
    for rec, image, trigger in zip(control, images, triggers, strict=True):
        cap, attacked = ratios(image, [encode_prompts(pipe, [rec.caption])[0], trigger])
        print(f"{rec.caption[:46]:46} {rec.kind:>9} {cap:7.2f} {attacked:6.2f}")


if __name__ == "__main__":
    main()
