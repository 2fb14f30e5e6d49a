"""Run a pruning mitigation per memorized prompt and measure it: the before/after table.

For each memorized caption (with a reference image) the method localizes a mask (saved in the run
directory: ``masks/<method>/<caption-slug>.{safetensors,json}``), and the caption is generated over the
seeds with its own mask applied (setting = method). Non-memorized captions are generated with the
joint mask (union over all memorized prompts, the strongest intervention) and compared, seed by seed,
with their unmitigated generations: ``pixel-ssim(mitigated, unmitigated)`` should stay high.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dori.analyses.distributed import SOLO, Shard, stored_only
from dori.analyses.replication import evaluate_replication
from dori.data.prompts import PromptRecord
from dori.errors import DoriError
from dori.metrics.base import ReplicationMetric
from dori.metrics.replication import memorization_rate
from dori.mitigations.masks import Mask, apply_mask
from dori.models.loading import model_id
from dori.reports.images import slug
from dori.reports.results import ItemStore

log = logging.getLogger(__name__)


def localize_masks(pipe, method, records: Sequence[PromptRecord], run_dir: Path,
                   shard: Shard = SOLO) -> dict[str, Mask]:
    """One mask per record, loaded from the run directory when a previous run (or another process of
    this one) already computed it."""
    if not getattr(method, "saves_masks", True):  # a fine-tuned UNet: one patch, read from its own files
        return {rec.caption: method.localize(pipe, rec.caption) for rec in records}
    params = json.loads(json.dumps(method.params(), default=str))  # as it reads back from the mask's JSON
    model = model_id(pipe)

    def one(rec: PromptRecord) -> Mask:
        path = run_dir / "masks" / method.name / slug(rec.caption)
        if path.with_suffix(".json").is_file():
            saved = Mask.load(path)
            if saved.meta.get("params") == params and saved.meta.get("model") == model:
                return saved
            stored_only(f"{method.name} mask of {rec.caption[:60]!r} made with this run's parameters")
            log.info("%s: the saved mask of %r was made with other parameters or another model; localizing again",
                     method.name, rec.caption[:60])
        stored_only(f"{method.name} mask of {rec.caption[:60]!r}")
        t0 = time.time()
        res = method.localize(pipe, rec.caption)
        mask = res.mask if hasattr(res, "mask") else res
        mask.meta.update(seconds=round(time.time() - t0, 2), params=params, model=model, process=shard.rank)
        mask.save(path)
        return mask

    got = shard.each(list(records), one, desc=f"{method.name} localize")
    return {rec.caption: mask for rec, mask in zip(records, got, strict=True)}


def attack_targets(records: Sequence[PromptRecord], max_targets: int | None = None) -> list[PromptRecord]:
    """The memorized records with a reference image, the first ``max_targets`` (None: all): the captions
    the mitigations localize a mask for and the attack targets."""
    return [r for r in records if r.memorized and r.reference_status == "ok"][:max_targets]


def require_unique_captions(records: Sequence[PromptRecord]) -> None:
    """Masks, triggers and tables are kept per caption: a target or control caption listed twice would be
    one item for two."""
    seen: Counter[str] = Counter(r.caption for r in records)
    twice = [c for c, n in seen.items() if n > 1]
    if twice:
        raise DoriError(f"the prompt set lists {len(twice)} caption(s) to mitigate or attack more than once, e.g. "
                        f"{twice[0][:60]!r}: masks, triggers and tables are kept per caption, so keep one record "
                        "per caption")


def first_per_kind(records: Sequence[PromptRecord], n: int | None) -> list[PromptRecord]:
    """The first ``n`` records of each kind, in their order (None: all)."""
    count: Counter[str] = Counter()
    out = []
    for r in records:
        count[r.kind] += 1
        if n is None or count[r.kind] <= n:
            out.append(r)
    return out


def run_mitigation(pipe, method, records: Sequence[PromptRecord], seeds: Sequence[int],
                   metric: ReplicationMetric, run_dir: str | Path, gen_kwargs: dict,
                   baseline_rows: list[dict], per_prompt_fidelity: bool = False, max_targets: int | None = None,
                   fidelity_per_kind: int | None = None, shard: Shard = SOLO) -> dict:
    """Localize per memorized prompt, evaluate, and return ``{"samples", "table", "summary", "masks"}``.

    ``max_targets`` mitigates only the first this many memorized records (None = all);
    ``fidelity_per_kind`` measures the effect on non-memorized captions with the first this many of each
    kind (None = all).

    With ``per_prompt_fidelity``, each non-memorized caption is also generated under one memorized
    caption's own mask (assigned in turn; setting ``<method>-own``), the intervention the per-image
    evaluation makes, next to the joint mask's (the union over all memorized captions), unless every
    caption has the same mask.
    ``shard``: this process's share of the work when several run (:mod:`dori.analyses.distributed`).
    """
    run_dir = Path(run_dir)
    store = ItemStore(run_dir)
    mem = attack_targets(records, max_targets)
    others = first_per_kind([r for r in records if not r.memorized], fidelity_per_kind)
    masks = localize_masks(pipe, method, mem, run_dir, shard)

    def under(mask: Mask, recs: Sequence[PromptRecord], setting: str, **extra) -> list[dict]:
        with apply_mask(pipe, mask):
            return evaluate_replication(pipe, recs, seeds, metric, run_dir, stage="mitigate", setting=setting,
                                        store=store, gen_kwargs=gen_kwargs, key_extra=(mask.digest(),), **extra)

    def own(rec: PromptRecord) -> list[dict]:  # a memorized caption under its own mask
        mask = masks[rec.caption]
        return under(mask, [rec], method.name, item_extra={"mask_size": len(mask)})

    rows = [r for got in shard.each(mem, own) for r in got]
    joint = None
    for m in masks.values():
        joint = m if joint is None else joint.union(m)
    joint.meta = {"method": method.name, "joint_over": [r.caption for r in mem]}
    if shard.main:
        joint.save(run_dir / "masks" / method.name / "_joint")
    with apply_mask(pipe, joint):
        rows += evaluate_replication(pipe, others, seeds, metric, run_dir, stage="mitigate",
                                     setting=f"{method.name}-joint", store=store, gen_kwargs=gen_kwargs,
                                     key_extra=(joint.digest(),), shard=shard)

    own_rows = []
    # (one mask for every caption, as a saved mask file gives: the joint rows are already these)
    if per_prompt_fidelity and mem and len({m.digest() for m in masks.values()}) > 1:
        def assigned(i: int) -> list[dict]:  # non-memorized captions under the i-th memorized caption's mask
            m_rec = mem[i]
            return under(masks[m_rec.caption], others[i :: len(mem)], f"{method.name}-own",
                         item_extra={"mask_of": m_rec.caption})

        own_rows = [r for got in shard.each([i for i in range(len(mem)) if others[i :: len(mem)]], assigned)
                    for r in got]
        rows += own_rows

    # before/after per memorized caption
    before = {}
    for r in baseline_rows:
        before.setdefault(r["caption"], []).append(r)
    table = []
    for rec in mem:
        b = before.get(rec.caption, [])
        a = [r for r in rows if r["caption"] == rec.caption and r["setting"] == method.name]
        table.append({"caption": rec.caption, "mask_size": len(masks[rec.caption]),
                      "score_before": statistics.fmean(r["score"] for r in b) if b else None,
                      "mr_before": memorization_rate(b) if b else None,
                      "score_after": statistics.fmean(r["score"] for r in a),
                      "mr_after": memorization_rate(a),
                      "seconds": masks[rec.caption].meta.get("seconds")}
                     # NeMo: the signal with the whole layer group deactivated, vs its threshold
                     | {k: masks[rec.caption].meta[k] for k in ("signal_floor", "threshold_reachable")
                        if k in masks[rec.caption].meta})
    # effect on non-memorized captions: mitigated vs unmitigated image of the same caption and seed
    joint_rows = [r for r in rows if r["setting"] == f"{method.name}-joint"]
    fidelity = _fidelity(run_dir, baseline_rows, joint_rows)
    summary = {
        "method": repr(method),
        "mr_before": memorization_rate([r for c in mem for r in before.get(c.caption, [])]),
        "mr_after": memorization_rate([r for r in rows if r["setting"] == method.name]),
        "mask_kind": joint.kind,  # "patch": a fine-tuned UNet, its size the number of weights it changed
        "joint_mask_size": len(joint),
        "joint_mask_counts": joint.counts(),
        "non_memorized_similarity_to_unmitigated": fidelity,
    }
    if own_rows:
        summary["non_memorized_similarity_per_prompt_mask"] = _fidelity(run_dir, baseline_rows, own_rows)
    return {"samples": rows, "table": table, "summary": summary, "masks": masks}


def _fidelity(run_dir: Path, baseline_rows: list[dict], mitigated_rows: list[dict]) -> dict:
    """pixel-ssim between each mitigated image and the unmitigated image of the same caption and seed,
    both read back from the run's PNGs (no generation is repeated)."""
    from dori.data.prompts import load_image
    from dori.metrics.pixel import PixelSSIM

    def load(rel):
        return load_image(run_dir / rel)

    plain = {(r["caption"], r["seed"]): r["image"] for r in baseline_rows}
    sim, vals = PixelSSIM(), []
    for r in mitigated_rows:
        ref = plain.get((r["caption"], r["seed"]))
        if ref is not None:
            vals.append(float(sim.score(load(r["image"])[None].float(), load(ref).float())[0]))
    out = {"measure": "pixel-ssim(mitigated, unmitigated), same seed", "n": len(vals)}
    return out | ({"mean": statistics.fmean(vals), "min": min(vals)} if vals else {"mean": None, "min": None})
