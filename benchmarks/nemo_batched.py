"""Batched vs sequential NeMo candidate checks on the tiny model: same neurons, time ratio.

    python benchmarks/nemo_batched.py [--prompts 2]

Prints, per memorized prompt, the UNet calls and seconds of both, whether the selected neuron sets are
identical, and the overall speed-up (sequential seconds / batched seconds).
"""

import argparse
import time

import torch

from dori import load_pipeline, load_prompt_set
from dori.data.tiny import tiny_stats_prompts
from dori.mitigations.nemo import NeMo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline("tiny")
    kw = dict(pipe.dori_method_defaults.get("nemo", {}))
    stats = tiny_stats_prompts()
    mem = [r.caption for r in load_prompt_set("tiny") if r.memorized][: args.prompts]
    total = {"seq": 0.0, "bat": 0.0}
    for p in mem:
        res = {}
        for name, b in (("seq", 1), ("bat", args.batch)):
            nemo = NeMo(**kw, batch_candidates=b)
            nemo.fit_statistics(pipe, stats)
            t0 = time.perf_counter()
            res[name] = nemo.localize(pipe, p)
            dt = time.perf_counter() - t0
            total[name] += dt
            print(f"{name} {p[:40]!r}: {res[name].stats.get('unet_calls')} UNet calls, {dt:.1f} s, "
                  f"{len(res[name].mask)} neurons")
        same = res["seq"].mask.counts() == res["bat"].mask.counts() and all(
            torch.equal(res["seq"].mask.layers[n], res["bat"].mask.layers[n]) for n in res["seq"].mask.layers)
        print(f"  identical neuron sets: {same}")
    print(f"speed-up (sequential / batched): {total['seq'] / total['bat']:.2f}x")


if __name__ == "__main__":
    main()
