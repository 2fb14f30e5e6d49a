"""The bypass benchmark (PAPER.md sections 5-6): attack a mitigation and measure what comes back.

For each setting (a mitigation with one mask per memorized caption, or ``"none"``: the model as it is),
every target image is attacked with DoRI under its own mask. The triggers kept at each budget of the
ladder (``budgets``, attack steps; 0 = the original prompt's embedding) are generated over the seeds
and scored against the target's reference image: one ``samples`` row per image, setting
``"<setting>+dori"``, budget = steps. The random-perturbation baseline (same ``||y - y0||`` as DoRI's
trigger at the largest budget) gives rows with setting ``"<setting>+random"``, and the discrete
baseline (``token_variants`` word-perturbed prompts per target, :class:`TokenPerturbation`) rows with
setting ``"<setting>+tokens"``, budget 0, the variant's prompt in ``trigger_prompt``.

The non-memorized control (seen-once and held-out photos on the tiny model, not-memorized images of
kind N on SD, e.g. NeMo's unmemorized LAION prompts; attacked with the same budget on the unmitigated
model) is always part of the run: an attack that forces any image is not evidence of retention.

Resuming: each attack group's triggers are saved (``triggers/<setting>/<caption>.safetensors``, with
the loss trace in a JSON beside it) and each generated caption is an item of the run's
:class:`~dori.reports.results.ItemStore`; a killed run started again redoes only what is missing, with
the same result (the attack and the generation are deterministic given their seeds).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from dori.analyses.distributed import SOLO, Shard, stored_only
from dori.analyses.mitigate import attack_targets
from dori.analyses.replication import EvalRequest, evaluate_requests
from dori.analyses.runfile import PAPER_BUDGETS
from dori.attacks.baselines import RandomPerturbation, TokenPerturbation
from dori.attacks.dori import DoRI
from dori.data.prompts import CONTROL_KINDS, MEMORIZED_KINDS, PromptRecord, load_reference
from dori.errors import DoriError
from dori.metrics.base import ReplicationMetric
from dori.metrics.replication import memorization_rate, summarize
from dori.mitigations.masks import Mask, apply_mask
from dori.models.generate import generate, model_resolution
from dori.models.loading import model_id
from dori.reports.images import slug
from dori.reports.results import ItemStore, tensor_digest, write_json, write_safetensors

log = logging.getLogger(__name__)


def control_records(records: Sequence[PromptRecord], per_kind: int | None = None,
                    kinds: Sequence[str] = CONTROL_KINDS) -> list[PromptRecord]:
    """The non-memorized control: records of ``kinds`` with a reference image (``per_kind`` of each)."""
    out = []
    for kind in kinds:
        recs = [r for r in records if r.kind == kind and r.reference_status == "ok"]
        out += recs[:per_kind] if per_kind is not None else recs
    return out


def early_stop_check(pipe, metric: ReplicationMetric, images: Sequence[torch.Tensor], gen_kwargs: dict, seed: int):
    """DoRI's optional early stop in the benchmark: a trigger passes when the one image it generates with
    sampling seed ``seed`` (not one the benchmark evaluates) replicates its target. The attacker holds
    the target image, so the check uses nothing an attacker would not have."""

    def check(triggers: torch.Tensor, idx: list[int]) -> torch.Tensor:
        out = generate(pipe, prompt_embeds=triggers, seeds=[seed], **gen_kwargs).images
        # the threshold each row of the evaluation uses (per reference, at the generated size)
        return torch.tensor([float(metric.score(out[i : i + 1], images[t])[0])
                             > metric.threshold_for(images[t], out.shape[-1]) for i, t in enumerate(idx)])

    return check


def early_stop_info(attack: DoRI, metric: ReplicationMetric, gen_kwargs: dict, seeds: Sequence[int]) -> dict:
    """What the early stop's check depends on: part of the triggers' cache key and of results.json."""
    return {"check_every": attack.check_every, "seed": max(seeds) + 1, "metric": repr(metric),
            "generation": dict(gen_kwargs)}


def target_images(pipe, references: Sequence[torch.Tensor]) -> torch.Tensor:
    """The attack's targets, ``T x 3 x R x R`` at the model's resolution R: each reference cropped to its
    centre square and resized (area when shrinking, bicubic when enlarging; dori's choice, close to how
    SD's training crops were made). A reference already R x R is used as it is (the tiny model's photos)."""
    import torch.nn.functional as F

    from dori.metrics.pixel import resize_square

    res = model_resolution(pipe)
    out = []
    for img in references:
        side = min(img.shape[-2:])
        if side >= res:
            img = resize_square(img, res)
        else:
            img = F.interpolate(resize_square(img, side)[None], size=(res, res), mode="bicubic")[0].clamp(0, 1)
        out.append(img)
    return torch.stack(out)


def _attack_group(pipe, attack: DoRI, recs: list[PromptRecord], setting: str, budgets: Sequence[int],
                  run_dir: Path, seed: int, mask: Mask | None, early: tuple | None = None,
                  process: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Triggers of one attack call, per budget and caption; loaded from disk when already computed.

    With restarts, each target keeps the restart with the lowest final loss (mean of the last 5 steps):
    the attacker's own criterion, blind to the replication metric; with early stop, the restart that
    passed the check first, if one did. ``early``: the early stop's ``(make_check(images), key)``, or None.
    ``process``: the process of the run that computes them, recorded with them.
    """
    paths = [run_dir / "triggers" / setting / f"{slug(r.caption)}.safetensors" for r in recs]
    references = [load_reference(r) for r in recs]
    images = target_images(pipe, references)
    # the target images' pixels are in the key: a run started again with other reference images attacks them
    key = {"attack": attack.params(), "budgets": list(budgets), "seed": seed, "group": [r.caption for r in recs],
           "model": model_id(pipe), "mask": mask.digest() if mask is not None else None,
           "targets": [tensor_digest(image) for image in images]}
    if early is not None:  # only then (the key of a run without early stop has no such entry)
        key["early_stop"] = early[1]
    params = json.loads(json.dumps(key))  # as read back
    if all(p.is_file() and json.loads(p.with_suffix(".json").read_text())["params"] == params for p in paths):
        loaded = [load_file(str(p)) for p in paths]
        return {b: {r.caption: t[f"budget_{b}"] for r, t in zip(recs, loaded, strict=True)} for b in budgets}
    stored_only(f"triggers (setting {setting!r}) of {[r.caption[:40] for r in recs]}")
    # the early stop scores against the references as the evaluation does (not the resized targets)
    check = early[0](references) if early is not None else None
    res = attack.attack(pipe, images, prompts=[r.caption for r in recs], seed=seed, snapshots=tuple(budgets),
                        check=check)
    loss = torch.tensor(res.loss) if res.loss else torch.zeros(1, len(res.target_index))
    out: dict[int, dict[str, torch.Tensor]] = {b: {} for b in budgets}
    for ti, (rec, path) in enumerate(zip(recs, paths, strict=True)):
        rows = [i for i, t in enumerate(res.target_index) if t == ti]
        stop = res.stopped_at
        best = min(rows, key=lambda i: (stop[i] is None, stop[i] or 0, float(loss[-5:, i].mean())))
        tensors = {f"budget_{b}": res.at(b)[best].contiguous().cpu() for b in budgets}
        for b in budgets:
            out[b][rec.caption] = tensors[f"budget_{b}"]
        meta = {"params": params, "caption": rec.caption, "restart": rows.index(best),
                "loss": [step[best] for step in res.loss], "distance": [step[best] for step in res.distance],
                "seconds_group": round(res.seconds, 2), "stopped_at": res.stopped_at[best], "process": process}
        write_safetensors(path, tensors)
        write_json(path.with_suffix(".json"), meta)  # written last: marks the trigger file as complete
    return out


def run_bypass(
    pipe,
    records: Sequence[PromptRecord],
    masks: Mapping[str, Mapping[str, Mask] | None],
    metric: ReplicationMetric,
    run_dir: str | Path,
    *,
    attack: DoRI,
    budgets: Sequence[int] = PAPER_BUDGETS,
    seeds: Sequence[int] = (0, 1, 2, 3),
    gen_kwargs: dict | None = None,
    control: Sequence[PromptRecord] = (),
    max_targets: int | None = None,
    random_baseline: bool = True,
    token_variants: int = 0,
    group_size: int = 4,
    seed: int = 0,
    prior_rows: Sequence[dict] = (),
    early_stop: bool = False,
    shard: Shard = SOLO,
) -> list[dict]:
    """Attack every memorized record under each setting of ``masks`` and the ``control`` records on the
    unmitigated model; return the sample rows (see the module docstring).

    Args:
        masks: setting name -> {caption: Mask} (one mask per memorized caption), or None for attacking
            the model as it is (e.g. a fine-tuned model; setting "none").
        budgets: the cost-curve ladder of attack steps; the attack runs ``max(budgets)`` steps.
        control: non-memorized records with a reference, attacked under setting "none".
        max_targets: attack only the first this many memorized records (None = all).
        random_baseline: also generate from Gaussian perturbations with the norm of DoRI's move.
        token_variants: word-perturbed prompts per target for the discrete baseline (0 = none).
        group_size: targets optimized together in one batched UNet call when they share a mask.
        prior_rows: rows already generated from the original captions with the same seeds, generation
            settings and metric (stage "generate", setting "none"; stage "mitigate", setting = the
            mitigation). A budget-0 trigger that equals its caption's embedding exactly gives the same
            images, so those rows are relabelled (same PNGs) instead of generated again.
        early_stop: every ``attack.check_every`` steps, generate each trigger once with a sampling seed
            outside ``seeds`` (the first after the largest) and freeze the triggers whose image already
            replicates their target; the attack ends when all have. A frozen trigger stands for every
            later budget of the ladder, and each trigger's JSON records ``stopped_at``. Off by default, as
            when reproducing the paper; it saves attack steps, not evaluation.
        shard: this process's share of the attack groups when several run (:mod:`dori.analyses.distributed`).
    """
    if token_variants < 0:
        raise DoriError(f"token_variants must be 0 or more, got {token_variants}")
    run_dir = Path(run_dir)
    store = ItemStore(run_dir)
    budgets = sorted({0, *(int(b) for b in budgets)})  # 0: the starting embedding, first point of the curve
    if max(budgets) != attack.steps:
        attack = DoRI(**{**attack.params(), "steps": max(budgets), "check_every": attack.check_every})
    gen_kwargs = gen_kwargs or {}
    mem = attack_targets(records, max_targets)
    jobs: list[tuple[str, Mask | None, list[PromptRecord]]] = []
    for setting, per_caption in masks.items():
        if per_caption is None:
            jobs += [(setting, None, mem[i : i + group_size]) for i in range(0, len(mem), group_size)]
            continue
        missing = [r.caption for r in mem if r.caption not in per_caption]
        if missing:
            raise DoriError(f"setting {setting!r} has no mask for: {missing}")
        jobs += [(setting, per_caption[r.caption], [r]) for r in mem]
    control = list(control)
    jobs += [("none", None, control[i : i + group_size]) for i in range(0, len(control), group_size)]

    plain: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in prior_rows:
        if r["stage"] in ("generate", "mitigate") and r["budget"] == 0:
            plain[(r["setting"], r["caption"])].append(r)
    early = None
    if early_stop:
        info = early_stop_info(attack, metric, gen_kwargs, seeds)
        early = (partial(early_stop_check, pipe, metric, gen_kwargs=gen_kwargs, seed=info["seed"]), info)

    def job_rows(job: tuple[str, Mask | None, list[PromptRecord]]) -> list[dict]:
        """One attack group under its mask: its triggers, and the rows of every budget and baseline."""
        setting, mask, recs = job
        rows: list[dict] = []
        with apply_mask(pipe, mask) if mask is not None else nullcontext():
            trig = _attack_group(pipe, attack, recs, setting, budgets, run_dir, seed, mask, early, shard.rank)
            under = (mask.digest(),) if mask is not None else ()  # item keys: never reuse another mask's images
            extra = {"attack": "dori", "mask_size": len(mask) if mask is not None else 0}
            # every budget and baseline of this job in one request list: their images share UNet batches
            reqs: list[tuple[EvalRequest, Callable[[dict], dict]]] = []
            for b in budgets:
                todo = recs
                if b == 0 and plain:
                    same = _unchanged(pipe, recs, trig[0], plain, setting, seeds)
                    todo = [r for r in recs if r.caption not in same]
                    rows += [row | {"stage": "bypass", "setting": f"{setting}+dori", **extra,
                                    "trigger_distance": 0.0}
                             for r in recs if r.caption in same for row in same[r.caption]]
                if todo:
                    reqs.append((EvalRequest(todo, "bypass", f"{setting}+dori", b, trig[b], extra, under),
                                 lambda r, b=b, trig=trig: r | {"trigger_distance": _dist(trig, b, r["caption"])}))
            if random_baseline:  # Gaussian noise with the norm of DoRI's move at the largest budget
                top = max(budgets)
                norms = [_dist(trig, top, r.caption) for r in recs]
                rp = RandomPerturbation().attack(pipe, None, [r.caption for r in recs], norms=norms, seed=seed)
                reqs.append((EvalRequest(recs, "bypass", f"{setting}+random", top,
                                         {r.caption: rp.trigger[i] for i, r in enumerate(recs)},
                                         {"attack": "random", "mask_size": extra["mask_size"]}, under),
                             lambda r, top=top, trig=trig: r | {"trigger_distance": _dist(trig, top, r["caption"])}))
            if token_variants:
                tp = TokenPerturbation(variants=token_variants).attack(pipe, None, [r.caption for r in recs], seed=seed)
                texts = tp.params["prompts"]
                for v in range(token_variants):
                    pick = {r.caption: i * token_variants + v for i, r in enumerate(recs)}
                    reqs.append((EvalRequest(recs, "bypass", f"{setting}+tokens", 0,
                                             {c: tp.trigger[i] for c, i in pick.items()},
                                             {"attack": "tokens", "variant": v, "mask_size": extra["mask_size"]},
                                             (*under, f"variant{v}")),
                                 lambda r, pick=pick, texts=texts: r | {"trigger_prompt": texts[pick[r["caption"]]]}))
            done = evaluate_requests(pipe, [q for q, _ in reqs], seeds, metric, run_dir, store=store,
                                     gen_kwargs=gen_kwargs)
            rows += [finish(r) for (_, finish), got in zip(reqs, done, strict=True) for r in got]
        return rows

    return [r for got in shard.each(jobs, job_rows, desc="bypass") for r in got]


def _unchanged(pipe, recs, trig0: dict[str, torch.Tensor], plain, setting: str, seeds) -> dict[str, list[dict]]:
    """caption -> the prior rows of the captions whose budget-0 trigger is exactly their own embedding."""
    from dori.models.generate import encode_prompts

    have = [r for r in recs if sorted(x["seed"] for x in plain.get((setting, r.caption), [])) == sorted(seeds)]
    if not have:
        return {}
    enc = encode_prompts(pipe, [r.caption for r in have])
    order = [int(s) for s in seeds]
    return {r.caption: sorted(plain[(setting, r.caption)], key=lambda x: order.index(x["seed"]))
            for r, e in zip(have, enc, strict=True) if torch.equal(trig0[r.caption].to(e), e)}


def _dist(trig: dict, budget: int, caption: str) -> float:
    return float((trig[budget][caption] - trig[0][caption]).norm())


def _stats(rows: list[dict]) -> dict:
    s = summarize(rows)
    return {k: s.get(k) for k in ("n_images", "n_samples", "mr", "mr_any_seed", "score_mean", "score_std")}


def bypass_table(samples: Sequence[dict], budgets: Sequence[int]) -> dict:
    """The paper's table and the cost curves, from sample rows (nothing is recomputed).

    Rows: memorized (no mitigation, the attacked targets), then per mitigation: original prompt, +DoRI at the
    largest budget, +random perturbation of the same norm; then the non-memorized control with and without
    DoRI.
    ``per_image``: the same rows per attacked image (generations that replicate, generations, best score), so
    that which images come back can be read without the sample rows.
    """
    top = max(budgets)
    by, by_kind = defaultdict(list), defaultdict(list)
    for s in samples:
        if s.get("score") is not None:
            memorized = s["kind"] in MEMORIZED_KINDS  # SD's prompt sets say VM, TM, MV, ...
            by[(s["stage"], s["setting"], s["budget"], memorized)].append(s)
            if s["stage"] == "bypass" and not memorized:
                by_kind[(s["setting"], s["kind"])].append(s)
    settings = sorted({s["setting"].rsplit("+", 1)[0] for s in samples if s["stage"] == "bypass"} - {"none"})
    table = []
    attacked = {(s["caption"], s["kind"] in MEMORIZED_KINDS) for s in samples if s["stage"] == "bypass"}
    per_image: dict[tuple, dict] = {}  # by caption and side: a caption may be a target and a control photo

    def add(label, rows):
        if rows:
            table.append({"setting": label, **_stats(rows)})
        for r in rows:
            key = (r["caption"], r["kind"] in MEMORIZED_KINDS)
            if key in attacked:
                img = per_image.setdefault(key, {"caption": r["caption"], "kind": r["kind"], "cells": {}})
                cell = img["cells"].setdefault(label, {"replicated": 0, "generations": 0, "score_max": r["score"]})
                cell["replicated"] += bool(r["replicated"])
                cell["generations"] += 1
                cell["score_max"] = max(cell["score_max"], r["score"])

    plain = [r for r in by[("generate", "none", 0, True)] if (r["caption"], True) in attacked]  # the same images
    add("memorized (no mitigation)", plain or by[("bypass", "none+dori", 0, True)])
    if by[("bypass", "none+dori", top, True)]:  # --mitigation none: the model as it is, attacked
        add(f"memorized + DoRI ({top} steps)", by[("bypass", "none+dori", top, True)])
        add("memorized + random (same norm)", by[("bypass", "none+random", top, True)])
        add("memorized + word-perturbed prompts", by[("bypass", "none+tokens", 0, True)])
    for m in settings:
        add(f"{m}", by[("bypass", f"{m}+dori", 0, True)])
        add(f"{m} + DoRI ({top} steps)", by[("bypass", f"{m}+dori", top, True)])
        add(f"{m} + random (same norm)", by[("bypass", f"{m}+random", top, True)])
        add(f"{m} + word-perturbed prompts", by[("bypass", f"{m}+tokens", 0, True)])
    add("non-memorized", by[("bypass", "none+dori", 0, False)])
    add(f"non-memorized + DoRI ({top} steps)", by[("bypass", "none+dori", top, False)])
    add("non-memorized + random (same norm)", by[("bypass", "none+random", top, False)])
    add("non-memorized + word-perturbed prompts", by[("bypass", "none+tokens", 0, False)])
    curves = {}
    for m in [*settings, "none"]:
        for mem, label in ((True, f"{m}+dori memorized"), (False, f"{m}+dori non-memorized")):
            pts = [(b, memorization_rate(by[("bypass", f"{m}+dori", b, mem)])) for b in budgets
                   if by[("bypass", f"{m}+dori", b, mem)]]
            if pts:
                curves[label] = {"budget": [p[0] for p in pts], "mr": [p[1] for p in pts]}
        # the control per kind as well: a seen-once photo forced may be weak memorization, a held-out one is not
        kinds = sorted(k for s, k in by_kind if s == f"{m}+dori")
        for kind in kinds if len(kinds) > 1 else ():
            rows = by_kind[(f"{m}+dori", kind)]
            pts = [(b, memorization_rate([r for r in rows if r["budget"] == b])) for b in budgets
                   if any(r["budget"] == b for r in rows)]
            curves[f"{m}+dori {kind}"] = {"budget": [p[0] for p in pts], "mr": [p[1] for p in pts]}
    return {"budgets": list(budgets), "table": table, "curves": curves, "per_image": list(per_image.values())}


def trigger_seconds(run_dir: str | Path, samples: Sequence[dict]) -> dict:
    """DoRI's wall time per target image (attack-group time / group size), read from the trigger metadata
    of the (setting, caption) pairs attacked in ``samples`` (this run's, not older files in the folder).
    Kept out of the sample rows: a resumed run has the same rows but not the same wall times."""
    vals = []
    for setting, caption in sorted({(r["setting"], r["caption"]) for r in samples if r.get("attack") == "dori"}):
        meta = Path(run_dir) / "triggers" / setting.rsplit("+", 1)[0] / f"{slug(caption)}.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            vals.append(m["seconds_group"] / len(m["params"]["group"]))
    return {"n": len(vals), "mean_seconds_per_image": statistics.fmean(vals) if vals else None}


def plot_bypass(bypass: dict, samples: Sequence[dict], threshold: float, plot_dir: Path) -> list[dict]:
    """MR-vs-steps curves (with the control) and a replication-score histogram per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dori.analyses.demo import _save_fig

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for label, c in bypass["curves"].items():
        per_kind = not label.endswith("memorized")  # one kind of the control: thinner, dotted
        ax.plot(c["budget"], c["mr"], marker="." if per_kind else "o", lw=1 if per_kind else 1.5,
                ls=":" if per_kind else "--" if "non-memorized" in label else "-", label=label)
    ax.set_xlabel("DoRI steps (budget)")
    ax.set_ylabel("MR")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, plot_dir / "bypass_mr_vs_steps.png")

    top = max(bypass["budgets"])
    groups = defaultdict(list)
    for s in samples:
        if s["stage"] == "bypass" and s["score"] is not None and s["budget"] in (0, top):
            kind = "memorized" if s["kind"] in MEMORIZED_KINDS else "non-memorized"
            # the table's order: mitigations, then the model as it is (memorized targets, then the control)
            groups[(s["setting"].startswith("none+"), kind, s["setting"], s["budget"])].append(s["score"])
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.3 * len(groups) + 0.6), dpi=100, sharex=True,
                             squeeze=False)
    for ax, ((_, kind, setting, budget), scores) in zip(axes[:, 0], sorted(groups.items()), strict=True):
        ax.hist(scores, bins=24, range=(-0.2, 1.0), color="tab:blue", alpha=0.7)
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_ylabel(f"{setting} @{budget}\n({kind}, n={len(scores)})", rotation=0, ha="right", va="center",
                      fontsize=7)
        ax.set_yticks([])
    axes[-1, 0].set_xlabel(f"replication score (dashed: threshold {threshold})")
    fig.tight_layout()
    _save_fig(fig, plot_dir / "bypass_scores.png")
    return [{"title": "Bypass: MR vs DoRI steps (dashed: non-memorized control)",
             "path": "plots/bypass_mr_vs_steps.png"},
            {"title": "Bypass: replication scores per setting", "path": "plots/bypass_scores.png"}]
