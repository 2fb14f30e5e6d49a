"""The locality analyses of DoRI (Kowalczuk et al., PAPER.md section 7): is a memorized image held in one
place of the model, as pruning mitigations assume?

DoRI is run from ``starts`` random ``N(0, I)`` embeddings per memorized image on the model as it is; the
triggers whose generations replicate the image at every evaluated seed are kept. Then:

1. **Embedding space** (:func:`trigger_spread`): how far the triggers of one image lie from each other,
   against the distance between different prompts' embeddings, and whether each trigger stays nearest
   its own start (the paper: triggers stay near their starts; their pairwise L2 exceeds that between
   different non-memorized prompts). dori reports the distances, not a t-SNE picture.
2. **Activations** (:func:`activation_divergence`): per layer, the mean pairwise L2 of the activations
   that the triggers of one image produce, against that of different memorized prompts (initial noise
   and timestep fixed: the first sampling step at one seed). The paper, NeMo's layers 1-7: triggers
   110-517, memorized prompts 72-405, the triggers higher in every layer. A value projection's output
   depends on the embedding only; other layer groups (e.g. ``ffn-out``) depend on the noise as well.
3. **Weights** (:func:`mask_agreement`): NeMo and Wanda run from each trigger (their ``embeds=``); per
   layer, the IoU of the selected sets averaged over pairs of triggers of one image (1 when both are
   empty), and each trigger's set against the original prompt's. Low agreement: no single set of
   weights holds the image. The paper, Wanda: 0.26-0.80 over 7 layers.

:func:`run_locality` runs the three and writes ``OUT/locality.json`` (manifest, settings, numbers) and
``OUT/plots/locality.png``; ``dori locality`` is its command. Resuming: each image's triggers
(``triggers/<caption>.safetensors``, their scores in a JSON beside it) and each trigger's masks
(``masks/<method>/<caption>/<start>``) are written as they finish; a killed run started again with the
same arguments redoes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dori.errors import DoriError

log = logging.getLogger(__name__)

METHODS = ("nemo", "wanda")


def mean_pairwise_l2(x: torch.Tensor) -> float | None:
    """Mean L2 distance over the unordered pairs of the rows of ``x`` (flattened); None for fewer than 2."""
    x = x.flatten(1).double()
    n = x.shape[0]
    if n < 2:
        return None
    d = torch.cdist(x, x)
    return float(d[torch.triu_indices(n, n, 1).unbind()].mean())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---- 1. embedding space ---------------------------------------------------------------------------------
def trigger_spread(triggers: Mapping[str, torch.Tensor], starts: Mapping[str, torch.Tensor],
                   prompt_embeds: Mapping[str, torch.Tensor], references: Mapping[str, torch.Tensor]) -> dict:
    """Distances in embedding space (all L2 over the flattened ``77 x D`` embedding).

    Args:
        triggers / starts: caption -> the kept triggers ``K x 77 x D`` and their random starts (same rows).
        prompt_embeds: caption -> the memorized prompt's own embedding (``77 x D``).
        references: name -> embeddings ``P x 77 x D`` of a group of prompts (e.g. non-memorized prompts),
            whose mean pairwise distance the triggers' is compared with.

    Per image: ``triggers`` (mean pairwise L2 of its triggers), ``starts`` (of their starts), ``moved``
    (mean ``||y - y0||``), ``to_prompt`` and ``starts_to_prompt`` (mean distance of the triggers and of their
    starts to the memorized prompt's embedding) and
    ``nearest_own_start`` (the fraction of triggers whose nearest start, among the image's kept ones,
    is their own). ``mean``: the per-image values averaged; ``references``: each group's mean pairwise L2.
    """
    per_image = {}
    for cap, trig in triggers.items():
        y0 = starts[cap]
        k = trig.shape[0]
        nearest = torch.cdist(trig.flatten(1).double(), y0.flatten(1).double()).argmin(1) if k else None
        per_image[cap] = {
            "kept": k,
            "triggers": mean_pairwise_l2(trig),
            "starts": mean_pairwise_l2(y0),
            "moved": float((trig - y0).flatten(1).norm(dim=1).mean()) if k else None,
            "to_prompt": float((trig - prompt_embeds[cap]).flatten(1).norm(dim=1).mean()) if k else None,
            "starts_to_prompt": float((y0 - prompt_embeds[cap]).flatten(1).norm(dim=1).mean()) if k else None,
            "nearest_own_start": float((nearest == torch.arange(k)).double().mean()) if k > 1 else None,
        }
    keys = ("triggers", "starts", "moved", "to_prompt", "starts_to_prompt", "nearest_own_start")
    return {"per_image": per_image, "mean": {k: _mean(v[k] for v in per_image.values()) for k in keys},
            "references": {name: mean_pairwise_l2(e) for name, e in references.items()}}


# ---- 2. activations ---------------------------------------------------------------------------------------
@torch.no_grad()
def layer_activations(pipe, embeds: torch.Tensor, layer_group: str, seed: int = 0,
                      batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per layer of ``layer_group``: the output of that layer for each embedding (``N x ...``, float32 on the
    CPU) in the first sampling step from seed ``seed``'s noise (the same noise for every embedding; the
    conditional branch only, guidance 1)."""
    from dori.models.generate import generate
    from dori.models.layers import resolve_layers

    refs = resolve_layers(pipe.unet, layer_group)
    got: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}

    def hook_for(name):
        def hook(module, args, output):
            got[name].append(output.detach().float().cpu())

        return hook

    handles = [r.module.register_forward_hook(hook_for(r.name)) for r in refs]
    try:
        generate(pipe, prompt_embeds=embeds, seeds=[seed], guidance_scale=1.0, stop_after=1, batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def activation_divergence(pipe, groups: Mapping[str, torch.Tensor], layer_group: str, seed: int = 0) -> dict:
    """Per layer (1-based id within ``layer_group``, as NeMo numbers them): the mean pairwise L2 of the
    activations within each group of embeddings (``groups``: name -> ``N x 77 x D``, e.g. the triggers of
    one image, or different memorized prompts). Returns ``{"layers": [names], "groups": {name: [per layer]}}``."""
    from dori.models.layers import resolve_layers

    names = [r.name for r in resolve_layers(pipe.unet, layer_group)]
    out = {}
    for group, embeds in groups.items():
        acts = layer_activations(pipe, embeds, layer_group, seed) if embeds.shape[0] > 1 else {}
        out[group] = [mean_pairwise_l2(acts[n]) if acts else None for n in names]
    return {"layer_group": layer_group, "seed": seed, "layers": names, "groups": out}


# ---- 3. weights -------------------------------------------------------------------------------------------
def _layer_iou(a, b, names: Sequence[str]) -> list[float]:
    iou = a.iou(b)
    return [iou.get(n, 1.0) for n in names]  # a layer neither selects from: both empty, IoU 1


def mask_agreement(trigger_masks: Sequence, prompt_mask, names: Sequence[str]) -> dict:
    """Per layer (``names``, in order): the IoU of the triggers' selected sets averaged over their pairs
    (``pairwise``), and of each trigger's set with the original prompt's (``to_prompt``); with the mean
    set sizes and how many trigger sets are empty."""
    pairs = [_layer_iou(a, b, names) for i, a in enumerate(trigger_masks) for b in trigger_masks[i + 1:]]
    to_prompt = [_layer_iou(m, prompt_mask, names) for m in trigger_masks]

    def sizes(m):
        return [m.counts().get(n, 0) for n in names]

    n = len(names)
    return {"pairwise": _by_layer(pairs, n), "to_prompt": _by_layer(to_prompt, n), "pairs": len(pairs),
            "trigger_size": _by_layer([sizes(m) for m in trigger_masks], n), "prompt_size": sizes(prompt_mask),
            "empty": sum(len(m) == 0 for m in trigger_masks), "masks": len(trigger_masks)}


def across_images(trigger_masks: Mapping[str, Sequence], names: Sequence[str]) -> list[float | None]:
    """Per layer, the IoU of two triggers' sets averaged over all pairs of triggers of *different* images
    (``trigger_masks``: image -> its triggers' masks): what any two sets share, the baseline for
    :func:`mask_agreement`'s ``pairwise`` (which averages per image first: here each pair counts once, so an
    image with more kept triggers weighs more). None where no two images have a mask."""
    images = list(trigger_masks)
    rows = [_layer_iou(a, b, names) for i, c in enumerate(images) for d in images[i + 1:]
            for a in trigger_masks[c] for b in trigger_masks[d]]
    return _by_layer(rows, len(names))


def _by_layer(rows: Sequence[Sequence[float | None]], n: int) -> list[float | None]:
    """Per column, the mean of the rows' values (None where no row has one)."""
    return [_mean(col) for col in zip(*rows, strict=True)] if rows else [None] * n


# ---- the run ----------------------------------------------------------------------------------------------
def _score(pipe, metric, triggers: torch.Tensor, reference: torch.Tensor, seeds: Sequence[int]):
    """Replication scores ``K x seeds`` of the images each trigger generates, against ``reference``, and the
    threshold they must beat (the bypass benchmark's, per reference at the generated size)."""
    from dori.models.generate import generate

    images = generate(pipe, prompt_embeds=triggers, seeds=seeds).images
    scores = metric.score(images, reference).view(triggers.shape[0], len(seeds))
    return scores, float(metric.threshold_for(reference, images.shape[-1]))


def image_seed(seed: int, caption: str) -> int:
    """The attack seed of one image: its own random starts and draws, whatever else the run analyses."""
    return int(hashlib.sha1(f"{seed}:{caption}".encode()).hexdigest()[:8], 16)


def find_triggers(pipe, attack, rec, reference: torch.Tensor, metric, seeds: Sequence[int], path: Path,
                  key: dict) -> dict:
    """DoRI from random starts for one image (``rec``, its ``reference`` image; ``attack``: a DoRI with
    ``init="random"``, run with attack seed ``key["attack_seed"]``); the triggers, their starts and scores, read
    from ``path`` when a run with the same ``key`` wrote them."""
    from dori.analyses.bypass import target_images
    from dori.reports.results import write_json, write_safetensors

    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == json.loads(json.dumps(key)):
            t = load_file(str(path))
            return {"trigger": t["trigger"], "init": t["init"], **meta}
    res = attack.attack(pipe, target_images(pipe, [reference]), seed=key["attack_seed"])
    scores, threshold = _score(pipe, metric, res.trigger, reference, seeds)
    at_start, _ = _score(pipe, metric, res.init, reference, seeds)  # the random starts themselves: a baseline
    meta = {"key": key, "caption": rec.caption, "kind": rec.kind, "scores": scores.tolist(), "threshold": threshold,
            "replicated": (scores > threshold).all(1).tolist(), "replicated_any": (scores > threshold).any(1).tolist(),
            "start_scores": at_start.tolist(),
            "replicated_at_start": (at_start > threshold).all(1).tolist(),
            "final_loss": res.loss[-1] if res.loss else None, "seconds": round(res.seconds, 2)}
    meta_path.unlink(missing_ok=True)  # an older run's record must never vouch for these tensors
    write_safetensors(path, {"trigger": res.trigger.contiguous().cpu(), "init": res.init.contiguous().cpu()})
    write_json(meta_path, meta)  # written last: marks the trigger file as complete
    return {"trigger": res.trigger.cpu(), "init": res.init.cpu(), **meta}


def _summary(found: dict) -> dict:
    keys = ("kind", "scores", "threshold", "replicated", "replicated_any", "start_scores", "replicated_at_start",
            "final_loss", "seconds")
    return {k: found[k] for k in keys}


def _localized(pipe, method, label: str, embeds: torch.Tensor, path: Path, key: dict):
    """``method``'s mask from one embedding, saved at ``path`` and read back when a run with the same ``key``
    (which holds the embedding's digest) made it."""
    from dori.mitigations.masks import Mask, mask_files

    key = json.loads(json.dumps(key, default=str))
    _, js, st = mask_files(path)
    if js.is_file() and st.is_file():
        saved = Mask.load(path)
        if saved.meta.get("locality_key") == key:
            return saved
    res = method.localize(pipe, label, embeds=embeds)
    mask = res.mask if hasattr(res, "mask") else res
    mask.meta["locality_key"] = key
    mask.save(path)  # the JSON last, an older one removed first
    return mask


def run_locality(out: str | Path, model: str = "tiny", prompt_set: str = "tiny", images_dir: str | None = None,
                 max_targets: int | None = 3, starts: int = 8, steps: int = 50, methods: Sequence[str] = METHODS,
                 seeds: Sequence[int] = (0, 1), seed: int = 0, attack: dict | None = None,
                 method_params: dict | None = None, stats_prompts: str | None = None, metric: str | None = None,
                 sscd_path: str | None = None, layer_group: str | None = None, control: int | None = 1,
                 device: str = "cpu", command: str = "dori locality") -> dict:
    """Run the three locality analyses on the first ``max_targets`` memorized images of ``prompt_set``
    (None: all): DoRI from ``starts`` random starts each, ``steps`` steps (attack seed ``seed``; ``attack``:
    more DoRI parameters), triggers kept when they replicate at every one of ``seeds``; NeMo and Wanda (those
    of ``methods``, with ``method_params``) from each kept trigger. ``layer_group``: the activations' layers
    (default: NeMo's layer group of this model). ``control``: non-memorized images per control kind (seen-once,
    held-out, N) attacked the same way, whose triggers must not replicate (None: all; 0: none). Writes ``out``
    (module docstring); returns locality.json's dict.
    """
    from dori.analyses.bypass import control_records
    from dori.analyses.demo import check_method_params, check_metric, make_attack, make_method, make_metric
    from dori.analyses.mitigate import attack_targets, localize_masks, require_unique_captions
    from dori.analyses.runfile import absolute_path
    from dori.attacks.dori import DoRI
    from dori.data.prompts import load_prompt_set, load_reference
    from dori.models.generate import encode_prompts
    from dori.models.layers import check_layer_group, resolve_layers
    from dori.models.loading import check_device, load_pipeline, model_id
    from dori.registry import MODELS, PROMPT_SETS
    from dori.reports.images import slug
    from dori.reports.results import make_out_dir, manifest, tensor_digest, write_json

    t0 = time.time()
    out = Path(out)
    model, prompt_set = absolute_path(model, MODELS), absolute_path(prompt_set, PROMPT_SETS)
    images_dir = images_dir and str(absolute_path(images_dir))
    stats_prompts = stats_prompts and str(absolute_path(stats_prompts, PROMPT_SETS))
    methods = list(methods)
    config = dict(model=str(model), prompt_set=str(prompt_set), images_dir=images_dir, max_targets=max_targets,
                  starts=starts, steps=steps, methods=methods, seeds=list(seeds), seed=seed, attack=attack,
                  method_params=method_params, stats_prompts=stats_prompts, metric=metric,
                  sscd_path=sscd_path and str(absolute_path(sscd_path)), layer_group=layer_group, control=control,
                  device=device)
    man = manifest(command, config, list(seeds))
    # every setting that can be checked before the model loads, with one clear error each
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise DoriError(f"--methods takes {' and '.join(METHODS)} (comma-separated, or none), got {bad}")
    if starts < 2:
        raise DoriError(f"--starts must be 2 or more (the analyses compare triggers of one image), got {starts}")
    if not seeds:
        raise DoriError("--seeds must name at least one sampling seed (e.g. 0,1)")
    if max_targets is not None and max_targets < 1:
        raise DoriError(f"--targets must be 1 or more (None: all), got {max_targets}")
    if control is not None and control < 0:
        raise DoriError(f"--control must be 0 or more images per control kind (None: all), got {control}")
    dori_params = {**(attack or {}), "init": "random", "restarts": starts, "steps": steps}
    try:
        DoRI(**dori_params)
    except (TypeError, ValueError) as e:
        raise DoriError(f"attack: {e}") from None
    if layer_group is not None:
        check_layer_group(layer_group)
    check_method_params(method_params or {}, methods)
    if "nemo" in methods and stats_prompts:
        load_prompt_set(stats_prompts, default_kind="N")  # read now: a bad file fails before the model loads
    check_metric(metric, str(model), sscd_path)
    records = load_prompt_set(prompt_set, images_dir)
    targets = attack_targets(records, max_targets)
    if not targets:
        raise DoriError(f"the prompt set {prompt_set} has no memorized prompt with its reference image on disk: "
                        "nothing to analyse (check --images-dir)")
    controls = control_records(records, per_kind=control) if control != 0 else []
    require_unique_captions(targets + controls)
    if not controls:
        log.warning("no non-memorized control is attacked (%s): whether DoRI from random starts forces any image "
                    "on this model is not checked", "--control 0" if control == 0 else "the prompt set has none "
                    "with a reference image")
    others = [r.caption for r in records if not r.memorized][:100]
    memorized = [r.caption for r in records if r.memorized][:100]
    check_device(device)
    make_out_dir(out)

    pipe = load_pipeline(model, device=device)
    dori = make_attack(pipe, dori_params)
    score_metric = make_metric(metric, pipe, sscd_path)
    made = {name: make_method(name, pipe, stats_prompts, (method_params or {}).get(name)) for name in methods}
    if layer_group is None:  # NeMo's layers (its shipped setting, or this run's)
        from dori.mitigations.nemo import NeMo

        layer_group = made["nemo"].layer_group if "nemo" in made else NeMo(
            **pipe.dori_method_defaults.get("nemo", {})).layer_group
    resolve_layers(pipe.unet, layer_group)  # a group this UNet lacks: one clear error, before any attack
    key = {"model": model_id(pipe), "attack": dori.params(), "seed": seed, "seeds": list(seeds),
           "metric": [repr(score_metric), getattr(score_metric, "source", None),
                      getattr(score_metric, "version", None)]}

    # 1. triggers from random starts, one attack per image (its starts in one batch); the same attack on the
    # non-memorized control, which must not replicate (else a trigger says nothing about memorization)
    found, forced = {}, {}
    for rec in tqdm(targets + controls, desc="DoRI from random starts"):
        path = out / ("triggers" if rec.memorized else "control") / f"{slug(rec.caption)}.safetensors"
        reference = load_reference(rec)
        got = find_triggers(pipe, dori, rec, reference, score_metric, seeds, path,
                            {**key, "caption": rec.caption, "reference": tensor_digest(reference),
                             "attack_seed": image_seed(seed, rec.caption)})
        (found if rec.memorized else forced)[rec.caption] = got
    kept = {c: torch.tensor(f["replicated"], dtype=torch.bool) for c, f in found.items()}
    triggers = {c: f["trigger"][kept[c]] for c, f in found.items()}
    prompt_embeds = {r.caption: encode_prompts(pipe, [r.caption])[0].cpu() for r in targets}
    references = {"non-memorized prompts": encode_prompts(pipe, others).cpu() if others else torch.empty(0),
                  "memorized prompts": encode_prompts(pipe, memorized).cpu()}
    spread = trigger_spread(triggers, {c: f["init"][kept[c]] for c, f in found.items()}, prompt_embeds,
                            {k: v for k, v in references.items() if v.shape[0] > 1})

    # 2. activations: the triggers of each image against different memorized prompts (and against the triggers'
    # random starts: how much of the triggers' divergence the starts already had)
    groups = {c: t for c, t in triggers.items() if t.shape[0] > 1}
    starts_of = {f"starts of {c}": found[c]["init"][kept[c]] for c in groups}
    div = activation_divergence(pipe, {**groups, **starts_of, "memorized prompts": references["memorized prompts"]},
                                layer_group, seed)
    for name, labels in (("triggers", list(groups)), ("starts", list(starts_of))):
        div[name] = _by_layer([div["groups"][c] for c in labels], len(div["layers"]))

    # 3. weights: each method from each kept trigger and from the original prompt (masks/<method>/<caption>, as
    # `dori mitigate` saves them)
    agreement = {}
    for name, method in made.items():
        names = [r.name for r in resolve_layers(pipe.unet, method.layer_group)]
        prompt_masks = localize_masks(pipe, method, targets, out)
        mkey = {"model": key["model"], "method": method.params()}
        work = [(c, i) for c in triggers for i in kept[c].nonzero().flatten().tolist()]
        trigger_masks: dict[str, list] = {c: [] for c in triggers}
        for cap, i in tqdm(work, desc=f"{name} from each trigger"):
            emb = found[cap]["trigger"][i][None]
            trigger_masks[cap].append(_localized(
                pipe, method, f"DoRI trigger {i} of {cap}", emb, out / "masks" / name / slug(cap) / f"start{i}",
                {**mkey, "trigger": tensor_digest(emb)}))
        rows = {c: mask_agreement(trigger_masks[c], prompt_masks[c], names) for c in triggers}
        prompts = list(prompt_masks.values())
        agreement[name] = {"layers": names, "params": json.loads(json.dumps(method.params(), default=str)),
                           "per_image": rows,
                           "pairwise": _by_layer([r["pairwise"] for r in rows.values()], len(names)),
                           "to_prompt": _by_layer([r["to_prompt"] for r in rows.values()], len(names)),
                           # baselines: the same pruning from triggers of different images, from different prompts
                           "across_images": across_images(trigger_masks, names),
                           "between_prompts": mask_agreement(prompts, prompts[0], names)["pairwise"]}

    man["seconds"] = round(time.time() - t0, 1)
    man["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = {"manifest": man, "attack": repr(dori), "metric": repr(score_metric),
              "triggers": {c: _summary(f) for c, f in found.items()},
              "control": {c: _summary(f) for c, f in forced.items()},
              "found": {side: {"images": len(got), "starts": starts * len(got),
                               "replicate": sum(sum(f["replicated"]) for f in got.values()),
                               "replicate_any_seed": sum(sum(f["replicated_any"]) for f in got.values()),
                               "replicate_at_start": sum(sum(f["replicated_at_start"]) for f in got.values())}
                        for side, got in (("memorized", found), ("control", forced))},
              "kept": {c: int(k.sum()) for c, k in kept.items()}, "starts": starts,
              "spread": spread, "activations": div, "weights": agreement,
              "reference_counts": {k: int(v.shape[0]) for k, v in references.items()},
              "plot": "plots/locality.png"}
    (out / "plots" / "locality.png").unlink(missing_ok=True)  # locality.json never points at an older run's plot
    write_json(out / "locality.json", result)
    plot_locality(result, out / "plots" / "locality.png")
    return result


def plot_locality(res: dict, path: Path) -> None:
    """Three panels: embedding distances, activation divergence per layer, IoU of pruned sets per layer."""
    import matplotlib

    from dori.analyses.demo import _save_fig

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=110)
    s = res["spread"]
    bars = {"triggers of one image": s["mean"]["triggers"], "their random starts": s["mean"]["starts"],
            **s["references"]}
    bars = {k: v for k, v in bars.items() if v is not None}
    axes[0].bar(range(len(bars)), list(bars.values()), color=["C3", "C7", "C0", "C1"][: len(bars)])
    axes[0].set_xticks(range(len(bars)), list(bars), rotation=20, ha="right", fontsize=7)
    axes[0].set_ylabel("mean pairwise L2 of embeddings")
    axes[0].set_title("1. embedding space", fontsize=9)
    a = res["activations"]
    ids = list(range(1, len(a["layers"]) + 1))
    for label, vals, color in (("triggers of one image", a["triggers"], "C3"),
                               ("their random starts", a["starts"], "C7"),
                               ("memorized prompts", a["groups"].get("memorized prompts"), "C1")):
        if vals and any(v is not None for v in vals):
            axes[1].plot(ids, [float("nan") if v is None else v for v in vals], "o-", color=color, label=label)
    axes[1].set_xlabel(f"layer of the group {a['layer_group']!r}")
    axes[1].set_ylabel("mean pairwise L2 of activations")
    axes[1].set_title("2. activations", fontsize=9)
    below = dict(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    axes[1].legend(**below)
    for i, (name, w) in enumerate(res["weights"].items()):
        if w["pairwise"]:
            axes[2].plot(range(1, len(w["layers"]) + 1), [float("nan") if v is None else v for v in w["pairwise"]],
                         "o-", color=f"C{i + 4}", label=f"{name}: triggers of one image")
        if any(v is not None for v in w["across_images"]):
            axes[2].plot(range(1, len(w["layers"]) + 1),
                         [float("nan") if v is None else v for v in w["across_images"]], "s--", color=f"C{i + 4}",
                         alpha=0.6, label=f"{name}: triggers of different images")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlabel("layer of the method's group")
    axes[2].set_ylabel("mean pairwise IoU of pruned sets")
    axes[2].set_title("3. weights", fontsize=9)
    if res["weights"]:
        axes[2].legend(**below)
    fig.tight_layout()
    _save_fig(fig, path)


def summary_lines(res: dict) -> list[str]:
    """The run's findings in a few printed lines (what ``dori locality`` says)."""

    def nums(values, fmt: str = ".2f") -> str:
        return " ".join("-" if v is None else format(v, fmt) for v in values)

    f, s, a = res["found"], res["spread"], res["activations"]
    mem, ctl = f["memorized"], f["control"]
    lines = [f"DoRI from {res['starts']} random starts per image: {mem['replicate']} of {mem['starts']} triggers of "
             f"{mem['images']} memorized images replicate at every seed ({mem['replicate_at_start']} of the starts "
             "alone); " + (f"control: {ctl['replicate']} of {ctl['starts']} on {ctl['images']} non-memorized images "
                           f"({ctl['replicate_any_seed']} at one seed or more)" if ctl["images"] else
                           "no non-memorized control was attacked: whether this attack forces any image is unknown")]
    if ctl["replicate"]:
        lines.append(f"warning: DoRI from random starts forced {ctl['replicate']} triggers of non-memorized images: on "
                     "this model a trigger that replicates is no evidence that the image is memorized")
    m, ref = s["mean"], s["references"]
    if m["triggers"] is not None:
        refs = "".join(f"; {k} {v:.1f}" for k, v in ref.items() if v is not None)
        lines.append(f"1. embedding space: triggers of one image lie {m['triggers']:.1f} apart (L2; their starts "
                     f"{m['starts']:.1f}{refs}); each moved {m['moved']:.1f} from its start, the nearest start "
                     f"is its own for {100 * m['nearest_own_start']:.0f}%; to the prompt's embedding "
                     f"{m['to_prompt']:.1f} (the starts {m['starts_to_prompt']:.1f})")
    else:
        lines.append("1. embedding space: no image has 2 triggers that replicate: nothing to compare "
                     "(more --starts or --steps)")
    trig, prompts = a["triggers"], a["groups"].get("memorized prompts", [])
    pairs = [(t, p) for t, p in zip(trig, prompts, strict=True) if t is not None and p is not None]
    if pairs:
        lines.append(f"2. activations ({a['layer_group']}, layers 1-{len(trig)}, mean pairwise L2): triggers of "
                     f"one image {nums(trig, '.1f')}; memorized prompts {nums(prompts, '.1f')}; the triggers' higher "
                     f"in {sum(t > p for t, p in pairs)} of {len(pairs)} layers (their random starts: "
                     f"{nums(a['starts'], '.1f')})")
    for name, w in res["weights"].items():
        lines.append(f"3. weights, {name} from each trigger (IoU per layer): between triggers of one image "
                     f"{nums(w['pairwise'])}; of different images {nums(w['across_images'])}; with the original "
                     f"prompt's {nums(w['to_prompt'])}; the original prompts' of different images "
                     f"{nums(w['between_prompts'])}")
    return lines
