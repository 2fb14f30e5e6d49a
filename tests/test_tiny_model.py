"""Acceptance of the shipped tiny model: it memorizes exactly its memorized photos.

Numbers measured on the shipped weights over more seeds are in docs/tiny-model.md (`dori demo`).
"""

import pytest
import torch

from dori import load_prompt_set
from dori.data.prompts import load_reference
from dori.metrics.pixel import PixelSSIM
from dori.metrics.procedural import check_procedural
from dori.models.generate import generate

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def generations(tiny_pipe):
    recs = load_prompt_set("tiny")
    out = generate(tiny_pipe, [r.caption for r in recs], seeds=SEEDS, batch_size=32)
    refs = [r for r in recs if r.reference_status == "ok"]
    sims = PixelSSIM().pairwise(out.images, [load_reference(r) for r in refs])
    return recs, refs, out, sims


def test_memorized_captions_replicate_their_photo(generations):
    recs, refs, out, sims = generations
    thr = PixelSSIM().threshold
    hits = []
    for j, p in enumerate(out.prompt_index):
        if recs[p].kind == "memorized":
            hits.append(bool(sims[j, refs.index(recs[p])] > thr))
    assert sum(hits) / len(hits) >= 0.9, f"{sum(hits)}/{len(hits)} memorized generations replicate"


@pytest.mark.xfail(strict=True, reason="known failure of the shipped tiny model (issue 2): unseen and held-out "
                   "photo-like captions regurgitate memorized photos; see docs/tiny-model.md")
def test_nothing_else_replicates_any_reference_photo(generations):
    recs, refs, out, sims = generations
    thr = PixelSSIM().threshold
    for j, p in enumerate(out.prompt_index):
        if recs[p].kind != "memorized":
            best = int(sims[j].argmax())
            assert sims[j, best] <= thr, (
                f"{recs[p].kind} caption {recs[p].caption!r} seed {out.seeds[j]} replicates "
                f"{refs[best].reference} (SSIM {sims[j, best]:.2f})")


@pytest.mark.xfail(strict=True, reason="known failure of the shipped tiny model (issue 2): procedural captions "
                   "get the named colour and shape in fewer than half of the seeds; see docs/tiny-model.md")
def test_procedural_captions_draw_the_named_shape_and_colour(generations):
    recs, _, out, _ = generations
    checks = [check_procedural(out.images[j], **recs[p].meta)
              for j, p in enumerate(out.prompt_index) if recs[p].kind == "procedural"]
    color = sum(c["color_ok"] for c in checks) / len(checks)
    shape = sum(c["shape_ok"] for c in checks) / len(checks)
    assert color > 0.5 and shape > 0.5, f"colour {color:.2f}, shape {shape:.2f}"  # "most seeds"


def test_memorized_generations_lack_diversity_across_seeds(generations):
    recs, _, out, _ = generations
    idx = torch.tensor(out.prompt_index)
    kinds = [recs[p].kind for p in out.prompt_index]

    def spread(kind):
        vals = []
        for p in {p for p, k in zip(out.prompt_index, kinds, strict=True) if k == kind}:
            imgs = out.images[idx == p]
            vals.append((imgs - imgs.mean(0)).pow(2).mean().sqrt())
        return torch.stack(vals).mean()

    assert spread("memorized") < 0.5 * spread("procedural")
