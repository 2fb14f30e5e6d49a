"""Does the tiny model key a memorized photo on its caption's content, or on its template?

    python benchmarks/template_probe.py [--model tiny|DIR] [--variants 8] [--n-seeds 4]

For each memorized caption, ``--variants`` captions keep its function words ("a", "of", "in", ... at
their places) and replace every other word with a word drawn at random from CLIP's 3,000 most frequent
(`dori.zoo.tiny_data.frequent_words`; seeded). A model that memorized the caption's content draws the
photo for none of them; a model that memorized the template ("a _ _ _ in _") draws it for many. Prints,
per memorized caption, how many variant generations replicate the caption's photo (pinned pixel-ssim
protocol), and the first variants that do.
"""

import argparse

import torch

from dori import load_pipeline, load_prompt_set
from dori.data.tiny import replication_scores
from dori.models.generate import generate
from dori.zoo.tiny_data import frequent_words

FUNCTION_WORDS = {"a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "from", "before", "under",
                  "among", "up", "to", "for"}


def template_variant(caption: str, words: list[str], g: torch.Generator) -> str:
    out = [w if w in FUNCTION_WORDS else words[int(torch.randint(len(words), (1,), generator=g))]
           for w in caption.split()]
    return " ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--n-seeds", type=int, default=4, help="seeds 0 .. N-1")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model, device=args.device)
    recs = load_prompt_set("tiny")
    words = frequent_words(pipe.tokenizer, 3000)
    g = torch.Generator().manual_seed(0)
    memorized = [r for r in recs if r.kind == "memorized"]
    variants = [(r, template_variant(r.caption, words, g)) for r in memorized for _ in range(args.variants)]
    out = generate(pipe, [v for _, v in variants], seeds=list(range(args.n_seeds)), batch_size=32)
    refs, sims, thr = replication_scores(out.images, recs)
    total = 0
    print(f"memorized captions: variant generations ({args.variants} variants x {args.n_seeds} seeds) that "
          "replicate the caption's own photo")
    for r in memorized:
        k = refs.index(r)
        rows = [j for j, p in enumerate(out.prompt_index) if variants[p][0] is r]
        hit_rows = [j for j in rows if sims[j, k] > thr[k]]
        total += len(hit_rows)
        shown = sorted({variants[out.prompt_index[j]][1] for j in hit_rows})[:2]
        print(f"  {len(hit_rows):>3}/{len(rows)}  {r.caption}" + "".join(f"\n         e.g. {s!r}" for s in shown))
    print(f"all: {total}/{len(out.prompt_index)} template-variant generations replicate the memorized photo")


if __name__ == "__main__":
    main()
