"""A fine-tuned mitigation, audited with `--finetuned`: ablate memorized captions by fine-tuning the tiny
UNet's cross-attention, save it as a diffusers UNet folder, then run the bypass benchmark on it.

    python benchmarks/finetuned_ablation.py --out /tmp/ablation [--targets 3] [--steps 300] [--lr 1e-3]

The fine-tune is in the spirit of concept ablation (Kumari et al. 2023, its cross-attention variant): only
the cross-attention key and value projections (``attn2.to_k``, ``attn2.to_v``) train, and the model's
output with a memorized caption c is steered, on noised copies of c's own training photo, to what the
unmitigated model predicts there with the empty prompt; seen-once captions keep their outputs::

    L = mean || f(z_t, t, c) - f_0(z_t, t, "") ||^2 + mean || f(z_t, t, c') - f_0(z_t, t, c') ||^2

(f_0: the unmitigated UNet, its outputs computed once, before training, over a fixed pool of (noise,
timestep) pairs; c': the seen-once captions on their own photos). It is an example of a fine-tuned
mitigation to exercise the benchmark, not a mitigation dori ships. The bypass then runs on the
unmitigated model loaded afresh, with the fine-tune as mitigation ``ablated``, on the first ``--targets``
memorized captions, at the demo's sizes (DoRI with 4 (noise, timestep) pairs per step, 2 control photos per
kind, one word-perturbed prompt per target) but seeds 0-3, budgets 0/10/50; it prints what ``dori attack``
prints. About 4 min for 3 targets on 2 cores.
"""

import argparse
from pathlib import Path

import torch

from dori import encode_prompts, load_pipeline, load_prompt_set
from dori.analyses.mitigate import attack_targets
from dori.data.prompts import load_reference
from dori.models.generate import predict_noise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for the fine-tuned UNet (OUT/unet) and the run (OUT/run)")
    ap.add_argument("--targets", type=int, default=3, help="memorized captions ablated and attacked (the first N)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=256, help="(noise, timestep) pairs per caption")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    pipe = load_pipeline("tiny")
    records = load_prompt_set("tiny")
    targets = attack_targets(records, args.targets)
    keep = [r for r in records if r.kind == "seen_once" and r.reference_status == "ok"]
    g = torch.Generator().manual_seed(args.seed)

    def pool(recs, anchor: str | None):
        """Noised photos, timesteps, caption embeddings and the frozen model's outputs to match."""
        z, t, y, target = [], [], [], []
        empty = encode_prompts(pipe, [""])[0]
        for rec in recs:
            clean = (load_reference(rec)[None] * 2 - 1).expand(args.pool, -1, -1, -1)
            noise = torch.randn(clean.shape, generator=g)
            ts = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (args.pool,), generator=g)
            zt = pipe.scheduler.add_noise(clean, noise, ts)
            own = encode_prompts(pipe, [rec.caption])[0]
            with torch.no_grad():
                cond = (empty if anchor == "" else own)[None].expand(args.pool, -1, -1)
                target.append(torch.cat([predict_noise(pipe, zt[i:i + 64], ts[i:i + 64], cond[i:i + 64])
                                         for i in range(0, args.pool, 64)]))
            z.append(zt), t.append(ts), y.append(own[None].expand(args.pool, -1, -1))
        return torch.cat(z), torch.cat(t), torch.cat(y), torch.cat(target)

    forget, retain = pool(targets, ""), pool(keep, None)
    names = [n for n, _ in pipe.unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n]
    params = dict(pipe.unet.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.Adam([params[n] for n in names], lr=args.lr)
    for step in range(1, args.steps + 1):
        loss = 0.0
        for z, t, y, target in (forget, retain):
            i = torch.randint(0, z.shape[0], (args.batch,), generator=g)
            loss = loss + (predict_noise(pipe, z[i], t[i], y[i]) - target[i]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    pipe.unet.save_pretrained(out / "unet")  # safetensors
    changed = sum(int((params[n].detach() != base[n]).sum()) for n in names)
    print(f"saved the fine-tuned UNet to {out / 'unet'} ({len(names)} projections trained, {changed} weights changed)")

    from dori.analyses.demo import run_demo
    from dori.cli import _print_results

    res = run_demo(out=out / "run", stages=["generate", "bypass"], finetuned={"ablated": str(out / "unet")},
                   seeds=[0, 1, 2, 3], budgets=[0, 10, 50], max_targets=args.targets, token_variants=1,
                   fidelity_per_kind=4, command="python benchmarks/finetuned_ablation.py")
    _print_results(res, out / "run")


if __name__ == "__main__":
    main()
