"""Acceptance of the shipped tiny model (issue 2): it memorizes exactly its memorized photos.

The same checks over more seeds: `python benchmarks/tiny_acceptance.py` (numbers in docs/tiny-model.md).
"""

import pytest
import torch

from dori import load_prompt_set
from dori.data.tiny import replication_scores
from dori.metrics.procedural import caption_blind_shape_score, check_procedural
from dori.models.generate import generate

# The seeds of `dori mitigate`, `dori attack` and the model card's tables. With 4 seeds, ">= 90% of seeds"
# means all 4.
SEEDS = [0, 1, 2, 3]
RECORDS = load_prompt_set("tiny")


def _cases(kinds):
    return [pytest.param(r.caption, id=f"{r.kind}:{r.caption[:40]}") for r in RECORDS if r.kind in kinds]


@pytest.fixture(scope="module")
def generations(tiny_pipe):
    out = generate(tiny_pipe, [r.caption for r in RECORDS], seeds=SEEDS, batch_size=32)
    # the pinned protocol: above 0.5 and above the reference's distractor score
    return out, *replication_scores(out.images, RECORDS)


def _rows(out, caption):
    p = [r.caption for r in RECORDS].index(caption)
    return [j for j, q in enumerate(out.prompt_index) if q == p]


@pytest.mark.parametrize("caption", _cases({"memorized"}))
def test_memorized_caption_replicates_its_photo(generations, caption):
    out, refs, sims, thresholds = generations
    k = [r.caption for r in refs].index(caption)
    scores = sims[_rows(out, caption), k]
    hits = scores > thresholds[k]
    assert hits.float().mean() >= 0.9, (  # the acceptance: >= 90% of seeds, per caption
        f"{int(hits.sum())}/{len(hits)} seeds replicate; scores {[round(float(s), 2) for s in scores]}")


@pytest.mark.parametrize("caption", _cases({"seen_once", "held_out", "procedural", "unseen"}))
def test_non_memorized_caption_replicates_no_reference_photo(generations, caption):
    out, refs, sims, thresholds = generations
    for j in _rows(out, caption):
        over = (sims[j] > thresholds).nonzero().flatten().tolist()
        assert not over, f"seed {out.seeds[j]} replicates " + ", ".join(
            f"{refs[k].reference} ({sims[j, k]:.2f} > {thresholds[k]:.2f})" for k in over)


def test_procedural_captions_draw_the_named_shape_and_colour(generations):
    out = generations[0]
    cases = [(check_procedural(out.images[j], **RECORDS[p].meta), RECORDS[p].meta["shape"])
             for j, p in enumerate(out.prompt_index) if RECORDS[p].kind == "procedural"]
    color = sum(c["color_ok"] for c, _ in cases) / len(cases)
    shape = sum(c["shape_ok"] for c, _ in cases) / len(cases)
    assert color > 0.5 and shape > 0.5, f"colour {color:.2f}, shape {shape:.2f}"  # "most seeds"
    # the shape word acts: well above what a model blind to it, drawing the same shapes, would score
    blind = caption_blind_shape_score([c["shape"] for c, _ in cases], [s for _, s in cases])
    assert shape > blind + 0.2, f"shape {shape:.2f}, caption-blind {blind:.2f}"


def test_memorized_generations_lack_diversity_across_seeds(generations):
    out = generations[0]
    idx = torch.tensor(out.prompt_index)
    kinds = [RECORDS[p].kind for p in out.prompt_index]

    def spread(kind):
        vals = []
        for p in {p for p, k in zip(out.prompt_index, kinds, strict=True) if k == kind}:
            imgs = out.images[idx == p]
            vals.append((imgs - imgs.mean(0)).pow(2).mean().sqrt())
        return torch.stack(vals).mean()

    assert spread("memorized") < 0.5 * spread("procedural")
