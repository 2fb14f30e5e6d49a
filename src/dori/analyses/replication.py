"""Generate every prompt over several seeds and measure replication: the rows of results.json.

This is the evaluation step every stage shares (plain model now; mitigated models and attack triggers
in later stages use the same function with a mask applied or with ``prompt_embeds``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dori.analyses.distributed import SOLO, Shard, missing_item, stored_only
from dori.data.prompts import PromptRecord, load_reference
from dori.metrics.base import ReplicationMetric
from dori.models.generate import generate
from dori.models.loading import model_id
from dori.reports.images import save_png, slug
from dori.reports.results import ItemStore, tensor_digest

log = logging.getLogger(__name__)


def reference_bank(records: Sequence[PromptRecord], run_dir: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Load every available reference image once; save a PNG copy under ``run_dir/references``."""
    bank = {}
    for r in records:
        if r.reference_status == "ok" and r.reference not in bank:
            img = load_reference(r)
            rel = f"references/{slug(r.reference)}.png"
            if not (run_dir / rel).is_file():
                save_png(img, run_dir / rel)
            bank[r.reference] = (rel, img)
    return bank


@dataclass
class EvalRequest:
    """One group of rows to evaluate: ``records x seeds`` under one stage, setting and budget.

    With ``embeds`` (caption -> ``77 x D`` embedding, e.g. an attack's trigger) the images are generated
    from those embeddings instead of the captions; the embedding's digest is part of the item key.
    ``key_extra`` joins the item key (e.g. the digest of the mask the model runs under), so that a
    resumed run never reuses images made under another mask. ``item_extra`` is added to every row.
    """

    records: Sequence[PromptRecord]
    stage: str = "generate"
    setting: str = "none"
    budget: int = 0
    embeds: dict[str, torch.Tensor] | None = None
    item_extra: dict | None = None
    key_extra: Sequence[str] = ()


def evaluate_replication(
    pipe,
    records: Sequence[PromptRecord],
    seeds: Sequence[int],
    metric: ReplicationMetric,
    run_dir: str | Path,
    *,
    stage: str = "generate",
    setting: str = "none",
    budget: int = 0,
    store: ItemStore | None = None,
    batch_size: int = 16,
    gen_kwargs: dict | None = None,
    item_extra: dict | None = None,
    embeds: dict[str, torch.Tensor] | None = None,
    key_extra: Sequence[str] = (),
    shard: Shard = SOLO,
) -> list[dict]:
    """Generate ``records x seeds`` and return one sample row per image (one :class:`EvalRequest`, see
    :func:`evaluate_requests`)."""
    req = EvalRequest(records, stage, setting, budget, embeds, item_extra, key_extra)
    return evaluate_requests(pipe, [req], seeds, metric, run_dir, store=store, batch_size=batch_size,
                             gen_kwargs=gen_kwargs, shard=shard)[0]


def evaluate_requests(
    pipe,
    requests: Sequence[EvalRequest],
    seeds: Sequence[int],
    metric: ReplicationMetric,
    run_dir: str | Path,
    *,
    store: ItemStore | None = None,
    batch_size: int = 16,
    gen_kwargs: dict | None = None,
    shard: Shard = SOLO,
) -> list[list[dict]]:
    """Generate every request's ``records x seeds`` and return its sample rows (a list per request).

    The pending images of all requests share UNet batches (e.g. every budget and baseline of one attack
    target in one sampling loop, instead of one small loop each). ``nearest_reference`` is searched among
    the references of all requests' records, so requests over the same records (as the bypass stage
    makes) get the rows each would get alone.

    Each row: stage, setting, budget, caption, kind, seed, image, reference, score, score_reference (the
    reference the score is against), threshold (what the score had to beat:
    ``metric.threshold_for(score_reference)``), replicated, metric, nearest_reference, nearest_score (best
    match among all references of the set), and for procedural captions the colour/shape check. A prompt
    with a reference is scored against it; one without (e.g. an unseen caption) against the reference it
    beats by the widest margin over that reference's own threshold (the "replicates any reference photo"
    check), or, beating none, against the nearest.
    Finished captions are stored in ``store`` and skipped when the run is resumed. With several processes
    (``shard``), each generates the pending captions whose item key it owns, and all get every row.
    """
    from dori.metrics.procedural import check_procedural
    from dori.models.generate import encode_prompts

    run_dir = Path(run_dir)
    store = store or ItemStore(run_dir)
    gen_kwargs = gen_kwargs or {}
    bank = reference_bank([r for q in requests for r in q.records], run_dir)
    ref_keys = list(bank)
    refs = [bank[k][1] for k in ref_keys] or None  # a list: references may differ in size

    def item_key(q: EvalRequest, rec: PromptRecord) -> str:
        digest = tensor_digest(q.embeds[rec.caption]) if q.embeds is not None else None
        return store.key(q.stage, q.setting, q.budget, rec.caption, rec.kind, list(seeds), gen_kwargs, metric.name,
                         getattr(metric, "source", None), getattr(metric, "version", None), model_id(pipe),
                         rec.reference, *([] if rec.reference else ["any-reference-by-margin"]),
                         *([digest] if digest else []), *q.key_extra)

    keys = [{r.caption: item_key(q, r) for r in q.records} for q in requests]
    pending = [(qi, r) for qi, q in enumerate(requests) for r in q.records
               if shard.owns(keys[qi][r.caption]) and store.get(keys[qi][r.caption]) is None]

    def item(qi: int, rec: PromptRecord) -> str:  # for the error of a process that finds an item missing
        q = requests[qi]
        return f"images of {rec.caption[:60]!r} ({q.stage} {q.setting}, budget {q.budget})"

    if pending:
        stored_only(item(*pending[0]))
    per_batch = max(1, batch_size // len(seeds))
    chunks = [pending[i : i + per_batch] for i in range(0, len(pending), per_batch)]
    first = requests[pending[0][0]] if pending else None
    desc = f"{first.stage}/{first.setting}" if first else "evaluate"
    for chunk in tqdm(chunks, desc=desc, disable=len(chunks) < 2 or not shard.main, leave=False):
        # captions are encoded together (as generate() would), triggers used as given
        texts = [r.caption for qi, r in chunk if requests[qi].embeds is None]
        enc = dict(zip(texts, encode_prompts(pipe, texts), strict=True)) if texts else {}
        e = [enc[r.caption] if requests[qi].embeds is None else requests[qi].embeds[r.caption] for qi, r in chunk]
        out = generate(pipe, prompt_embeds=torch.stack([x.to(e[0]) for x in e]), seeds=seeds,
                       batch_size=batch_size, **gen_kwargs)
        sims = metric.pairwise(out.images, refs) if refs else None
        size = out.images.shape[-1]
        thresholds = None  # every reference's threshold, for prompts without a reference of their own
        rows: dict[int, list[dict]] = {}
        for j, (pi, seed) in enumerate(zip(out.prompt_index, out.seeds, strict=True)):
            qi, rec = chunk[pi]
            q, key = requests[qi], keys[qi][rec.caption]
            # the item key in the name: images made under other settings, masks or embeddings never collide
            rel = f"images/{q.stage}/{q.setting}/{q.budget}/{slug(rec.caption)}_{key[:8]}_s{seed}.png"
            save_png(out.images[j], run_dir / rel)
            row = {"stage": q.stage, "setting": q.setting, "budget": q.budget, "caption": rec.caption,
                   "kind": rec.kind, "seed": seed, "image": rel, "reference": None, "score": None,
                   "replicated": None, "metric": metric.name, "reference_status": rec.reference_status}
            if sims is not None:
                best = int(sims[j].argmax())
                row["nearest_reference"] = bank[ref_keys[best]][0]
                row["nearest_score"] = float(sims[j, best])
            if rec.reference_status == "ok":
                row["reference"] = bank[rec.reference][0]
                row["score"] = float(sims[j, ref_keys.index(rec.reference)])
                against = rec.reference
            elif sims is not None:
                # replicates any reference photo: the one it beats by the widest margin over that
                # reference's own threshold, or (beating none) the nearest one
                if thresholds is None:
                    thresholds = metric.thresholds_for(refs, size)
                margin = sims[j] - thresholds
                against = ref_keys[int(margin.argmax()) if bool((margin > 0).any()) else best]
                row["score"] = float(sims[j, ref_keys.index(against)])
            if row["score"] is not None:
                row["score_reference"] = bank[against][0]
                row["threshold"] = metric.threshold_for(bank[against][1], size)
                row["replicated"] = bool(row["score"] > row["threshold"])
            if rec.kind == "procedural" and {"color", "shape"} <= rec.meta.keys():
                chk = check_procedural(out.images[j], rec.meta["color"], rec.meta["shape"], rec.meta.get("background"))
                row["procedural"] = {k: chk[k] for k in ("color", "shape", "background", "color_ok",
                                                          "shape_ok", "background_ok", "ok")}
            row.update(q.item_extra or {})
            rows.setdefault(pi, []).append(row)
        for pi, (qi, rec) in enumerate(chunk):
            store.put(keys[qi][rec.caption], rows[pi])
    shard.wait()  # the other processes' captions are on disk from here

    def stored(qi: int, rec: PromptRecord) -> list[dict]:
        got = store.get(keys[qi][rec.caption])
        if got is None:  # only with several processes: another one owns it
            raise missing_item(shard, item(qi, rec))
        return got

    return [[row for r in q.records for row in stored(qi, r)] for qi, q in enumerate(requests)]
