"""Cost of one DoRI step relative to a bare UNet forward + backward at the same batch (tiny model).

    python benchmarks/dori_step.py [--targets 4] [--pairs 8] [--steps 20] [--threads 2] [--device cuda]

The bare step is what any embedding attack must pay: one UNet forward at batch targets x pairs, a
backward to the embedding, an Adam update. DoRI adds the noise/timestep draws, the loss and its traces.
Prints both times, the ratio (target <= 1.2x) and the time per attacked image at the paper's 50 steps.
"""

import argparse
import time

import torch

from dori import load_pipeline, load_prompt_set
from dori.attacks.dori import DoRI
from dori.data.prompts import load_reference
from dori.models.generate import encode_prompts, predict_noise, training_target


def bare_steps(pipe, images, prompts, pairs, steps):
    dev = pipe.unet.device
    y = encode_prompts(pipe, prompts).repeat_interleave(pairs, 0).clone().requires_grad_(True)
    x = (images * 2 - 1).repeat_interleave(pairs, 0).to(dev)
    t = torch.randint(0, 1000, (x.shape[0],), device=dev)
    target = training_target(pipe.scheduler, x, torch.randn_like(x), t)  # eps, or v for a v-model
    opt = torch.optim.Adam([y], lr=0.1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = (predict_noise(pipe, x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("tiny", device=args.device)
    recs = [r for r in load_prompt_set("tiny") if r.memorized][: args.targets]
    images = torch.stack([load_reference(r) for r in recs])
    prompts = [r.caption for r in recs]
    attack = DoRI(steps=args.steps, pairs=args.pairs)
    bare_steps(pipe, images, prompts, args.pairs, 2)  # warm-up
    attack.attack(pipe, images, prompts=prompts)
    bare, dori = [], []
    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared and noisy
        bare.append(bare_steps(pipe, images, prompts, args.pairs, args.steps))
        dori.append(attack.attack(pipe, images, prompts=prompts).seconds / args.steps)
    b, d = min(bare), min(dori)
    batch = args.targets * args.pairs
    print(f"UNet batch {batch} ({args.targets} targets x {args.pairs} pairs), {args.threads} threads")
    print(f"bare forward+backward+Adam: {b * 1000:.1f} ms/step")
    print(f"DoRI step:                  {d * 1000:.1f} ms/step")
    print(f"ratio DoRI / bare: {d / b:.3f}x (target <= 1.2x)")
    print(f"time per attacked image at 50 steps: {50 * d / args.targets:.1f} s")


if __name__ == "__main__":
    main()
