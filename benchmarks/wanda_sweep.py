"""Wanda's layer group and sparsity on the tiny model: MR of the memorized captions against the side effect.

    python benchmarks/wanda_sweep.py [GROUP:SPARSITY ...] [--per-kind 3] [--model DIR]

Default settings: ffn-out at 1, 10, 20, 30% per row and value at 10, 20, 30, 50%. For each: one Wanda mask per
memorized caption; MR of each caption under its own mask (seeds 0-3, the model's guidance); and pixel-ssim
between mitigated and unmitigated generations of the first ``--per-kind`` non-memorized captions of each kind
(seeds 0-1, same seed), under the joint mask (union over the 8 captions) and under the first memorized
caption's own mask. Last, per layer group, the smallest sparsity with MR <= 0.125, and whether a lower setting
was tried (if not, the pick is not bracketed). The tiny model's shipped setting (`dori_defaults.json`, 11%) is
the smallest ffn-out sparsity with MR <= 0.125 on the grid 1, 2, 4, 6, 8, 9, 10, 11, 12% (1-10% fail, 11%
passes; docs/mitigations.md). Apply the same grid to a retrained model before attacking it (on training seed 2
the rule picks 4%, and Wanda + DoRI there differs from 10%: 0.97 against 0.69; docs/attacks.md):

    python benchmarks/wanda_sweep.py --model DIR ffn-out:0.01 ffn-out:0.02 ffn-out:0.04 ffn-out:0.06 \\
        ffn-out:0.08 ffn-out:0.09 ffn-out:0.1 ffn-out:0.11 ffn-out:0.12
"""

import argparse
import time

import torch

from dori import load_pipeline, load_prompt_set
from dori.analyses.mitigate import first_per_kind
from dori.data.prompts import load_reference
from dori.metrics.pixel import PixelSSIM
from dori.mitigations.masks import apply_mask
from dori.mitigations.wanda import Wanda
from dori.models.generate import generate

RULE_MR = 0.125  # one memorized caption's worth of 8
DEFAULT = ("ffn-out:0.01", "ffn-out:0.1", "ffn-out:0.2", "ffn-out:0.3",
           "value:0.1", "value:0.2", "value:0.3", "value:0.5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="*", default=DEFAULT, help="GROUP:SPARSITY, e.g. ffn-out:0.2")
    ap.add_argument("--per-kind", type=int, default=3)
    ap.add_argument("--model", default="tiny", help="tiny, or a retrained one (dori zoo train-tiny --out DIR)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe, metric = load_pipeline(args.model), PixelSSIM()
    records = load_prompt_set("tiny")
    mem = [r for r in records if r.memorized]
    others = [r.caption for r in first_per_kind([r for r in records if not r.memorized], args.per_kind)]
    seeds, side_seeds = [0, 1, 2, 3], [0, 1]
    plain = generate(pipe, others, seeds=side_seeds).images

    def similarity(mask) -> float:
        with apply_mask(pipe, mask):
            return metric.pairwise(generate(pipe, others, seeds=side_seeds).images, plain).diagonal().mean().item()

    print(f"{'setting':14} {'MR':>5} {'sim joint':>9} {'sim own':>7}  MR per caption")
    results = {}  # layer group -> [(sparsity, MR)]
    for spec in args.settings:
        group, sparsity = spec.split(":")
        t0 = time.time()
        wanda = Wanda(layer_group=group, sparsity=float(sparsity))
        masks = [wanda.localize(pipe, r.caption) for r in mem]
        mrs = []
        for rec, mask in zip(mem, masks, strict=True):
            with apply_mask(pipe, mask):
                scores = metric.score(generate(pipe, [rec.caption], seeds=seeds).images, load_reference(rec))
            mrs.append(metric.replicated(scores).float().mean().item())
        joint = masks[0]
        for m in masks[1:]:
            joint = joint.union(m)
        mr = sum(mrs) / len(mrs)
        print(f"{spec:14} {mr:5.2f} {similarity(joint):9.2f} {similarity(masks[0]):7.2f}  "
              + " ".join(f"{x:.2f}" for x in mrs) + f"  ({time.time() - t0:.0f} s)", flush=True)
        results.setdefault(group, []).append((float(sparsity), mr))
    for group, rows in results.items():
        ok = [s for s, m in rows if m <= RULE_MR]
        if not ok:
            pick = "none of these settings passes: try higher"
        elif min(ok) == min(s for s, _ in rows):
            pick = f"{min(ok):g}, the lowest setting tried: not bracketed, try lower"
        else:
            pick = f"{min(ok):g}"
        print(f"{group}: smallest sparsity with MR <= {RULE_MR} (the shipped rule): {pick}")


if __name__ == "__main__":
    main()
