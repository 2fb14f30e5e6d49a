"""NeMo's candidate checks on the tiny model: the reference procedure against dori's, same neurons.

    python benchmarks/nemo_batched.py [--prompts 2] [--batch 16] [--device cuda]   (--batch 0 skips the batched way)

Three ways to run the same search, per memorized prompt:
- ``reference``: one full UNet call per candidate check (the reference code's procedure);
- ``sequential+replay``: one check per call, reusing the accepted state's forward up to the first changed
  layer (dori's default);
- ``batched+replay``: ``--batch`` checks per UNet call, speculatively, plus the replay.

Prints UNet calls, seconds and the number of neurons of each, whether each way's selected neuron set is
identical to the reference's, and the speed-ups (reference seconds / seconds). First it prints, per
value layer, the share of a full UNet forward's time spent before that layer is called: an upper bound
on what a check that changes only that layer can skip (``--prompts 0`` prints only this; the share
moves with the machine's load).
"""

import argparse
import time
from functools import partial

import torch

from dori import load_pipeline, load_prompt_set
from dori.data.tiny import tiny_stats_prompts
from dori.mitigations.nemo import NeMo
from dori.models.layers import resolve_layers


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def prefix_shares(pipe, group: str, batch: int = 10, repeats: int = 10) -> dict[str, float]:
    """Per layer of ``group``: mean share of a UNet forward's time spent before the layer is called."""
    stamps, shares = {}, {}
    dev = pipe.unet.device
    refs = resolve_layers(pipe.unet, group)
    handles = [r.module.register_forward_pre_hook(lambda m, a, n=r.name: stamps.__setitem__(n, clock(dev)))
               for r in refs]
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    x = torch.randn(batch, pipe.unet.config.in_channels, size, size, generator=g).to(dev)
    e = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size, generator=g).to(dev)
    for i in range(repeats + 2):
        t0 = clock(dev)
        pipe.unet(x, 500, encoder_hidden_states=e)
        t1 = clock(dev)
        for n, t in stamps.items():
            if i >= 2:  # 2 warm-up forwards
                shares[n] = shares.get(n, 0.0) + (t - t0) / (t1 - t0) / repeats
    for h in handles:
        h.remove()
    return shares


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline("tiny", device=args.device)
    now = partial(clock, torch.device(args.device))
    kw = dict(pipe.dori_method_defaults.get("nemo", {}))
    stats = tiny_stats_prompts()
    mem = [r.caption for r in load_prompt_set("tiny") if r.memorized][: args.prompts]
    print(f"device {args.device}")
    print(f"share of a UNet forward (batch 10) before each {kw.get('layer_group', 'nemo-value')!r} layer:")
    for name, share in prefix_shares(pipe, kw.get("layer_group", "nemo-value")).items():
        print(f"  {share:5.1%}  {name}")
    ways = {"reference": (1, False), "sequential+replay": (1, True)}
    if args.batch:
        ways["batched+replay"] = (args.batch, True)
    total = dict.fromkeys(ways, 0.0)
    for p in mem:
        res = {}
        for name, (batch, reuse) in ways.items():
            nemo = NeMo(**kw, batch_candidates=batch, reuse_prefix=reuse)
            nemo.fit_statistics(pipe, stats)
            t0 = now()
            res[name] = nemo.localize(pipe, p)
            dt = now() - t0
            total[name] += dt
            print(f"{name:18s} {p[:40]!r}: {res[name].stats.get('unet_calls')} UNet calls, {dt:.1f} s, "
                  f"{len(res[name].mask)} neurons, {res[name].stats.get('replayed_units', 0)} module calls replayed")
        ref = res["reference"].mask
        for name, r in res.items():
            if name != "reference":
                same = r.mask.counts() == ref.counts() and all(torch.equal(ref.layers[n], r.mask.layers[n])
                                                               for n in ref.layers)
                print(f"  {name}: neuron set identical to the reference's: {same}")
    for name in ways if mem else ():
        print(f"speed-up of {name} over the reference: {total['reference'] / total[name]:.2f}x")


if __name__ == "__main__":
    main()
