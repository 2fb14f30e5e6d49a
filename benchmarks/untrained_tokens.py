"""Do the text encoder's untrained token embeddings decide which unseen captions regurgitate?

    python benchmarks/untrained_tokens.py [--model tiny|DIR] [--n-seeds 16]

The tiny model's training captions use a few hundred of CLIP's 49,408 tokens; the other token
embeddings keep their random initial values. This prints how many are trained, then, for three versions
of the embedding table (as trained; untrained rows set to the mean of the trained ones; set to zero),
how many unseen and held-out generations replicate a reference photo under the pinned pixel-ssim
protocol, and how many memorized generations replicate their own photo. The last two versions leave
every caption made of trained tokens unchanged. For models trained on the recipe's default data; a
model whose recipe recaptions the random crops (`crop_extra_words`, `crop_template_captions`, shipped
since 2026-12-01) also trains the frequent words it draws, and those count as trained.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from dori import load_pipeline, load_prompt_set
from dori.data.tiny import replication_scores
from dori.models.generate import generate
from dori.models.loading import resolve_model_path
from dori.zoo.tiny_data import TinyDataSpec, build_train_set, frequent_words


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n-seeds", type=int, default=16, help="seeds 0 .. N-1")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model)
    tok = pipe.tokenizer
    seen = set()
    spec = TinyDataSpec()
    for c in build_train_set(spec).captions:
        seen.update(tok(c, padding="max_length", max_length=tok.model_max_length).input_ids)
    recipe = Path(resolve_model_path(args.model)) / "dori_recipe.json"
    data = json.loads(recipe.read_text()).get("data", {}) if recipe.exists() else {}
    if data.get("crop_extra_words") or data.get("crop_template_captions"):
        vocab = frequent_words(tok, data.get("crop_vocabulary", spec.crop_vocabulary))  # as the recipe drew them
        seen.update(tok.convert_tokens_to_ids([w + "</w>" for w in vocab]))
    emb = pipe.text_encoder.get_input_embeddings().weight
    orig = emb.detach().clone()
    trained = torch.zeros(emb.shape[0], dtype=torch.bool)
    trained[sorted(seen)] = True
    print(f"{int(trained.sum())} of {emb.shape[0]} token embeddings trained; mean norm trained "
          f"{orig[trained].norm(dim=1).mean():.3f}, untrained {orig[~trained].norm(dim=1).mean():.3f}")
    recs = load_prompt_set("tiny")
    asked = [r for r in recs if r.kind in ("unseen", "held_out", "memorized")]
    for name, value in (("as trained", None), ("untrained -> mean of trained", orig[trained].mean(0)),
                        ("untrained -> zero", torch.zeros(emb.shape[1]))):
        with torch.no_grad():
            emb.copy_(orig)
            if value is not None:
                emb[~trained] = value
        out = generate(pipe, [r.caption for r in asked], seeds=list(range(args.n_seeds)), batch_size=32)
        refs, sims, thr = replication_scores(out.images, recs)
        hits, mem_hits, n_other = Counter(), 0, 0
        for j, p in enumerate(out.prompt_index):
            r = asked[p]
            if r.kind == "memorized":
                k = refs.index(r)
                mem_hits += bool(sims[j, k] > thr[k])
                continue
            n_other += 1
            over = (sims[j] > thr).nonzero().flatten().tolist()
            if over:
                hits[f"{r.caption!r} -> {refs[over[0]].caption!r}"] += 1
        n_mem = len(out.prompt_index) - n_other
        print(f"{name}: unseen/held-out replicating {sum(hits.values())}/{n_other}, "
              f"memorized replicating {mem_hits}/{n_mem}")
        for k, v in hits.most_common():
            print(f"    {v:>3}  {k}")
    with torch.no_grad():
        emb.copy_(orig)


if __name__ == "__main__":
    main()
