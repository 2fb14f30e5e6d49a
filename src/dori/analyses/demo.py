"""``dori demo``: generate every caption of a prompt set over several seeds and measure replication."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dori.analyses.distributed import Shard, stored_only
from dori.analyses.mitigate import attack_targets, require_unique_captions, run_mitigation
from dori.analyses.runfile import absolute_path, write_run_file
from dori.data.prompts import load_control_set, load_prompt_set
from dori.errors import DoriError
from dori.metrics.replication import summarize
from dori.mitigations.finetuned import FineTunedUNet
from dori.mitigations.masks import SavedMasks, mask_files
from dori.models.layers import check_layer_group, resolve_layers
from dori.models.loading import check_device, load_pipeline, model_id
from dori.reports.html import render_report
from dori.reports.results import SCHEMA_VERSION, ItemStore, make_out_dir, manifest, write_json

log = logging.getLogger(__name__)

# The demo is sized to finish in under 5 minutes on 2 CPU cores: 2 seeds, DoRI with 4 (noise, timestep)
# pairs per step instead of the paper's 8, a 3-point cost curve and 2 control photos per kind.
# `dori attack` runs the paper's settings (8 pairs, budgets 0/1/10/25/50, every control photo).
DEMO_SEEDS = (0, 1)
DEMO_ATTACK = {"pairs": 4}
DEMO_BUDGETS = (0, 10, 50)
# The demo mitigates and attacks the first 3 memorized images and measures the mitigations' effect on 4
# captions of each non-memorized kind, so that every stage (NeMo included) fits in 5 minutes on 2 CPU
# cores; `dori attack` and `dori mitigate` use them all.
DEMO_TARGETS = 3
DEMO_FIDELITY_PER_KIND = 4
STAGES = ("generate", "detect", "nemo", "wanda", "bypass")
DEFAULT_STAGES = STAGES  # 246 s on 2 CPU cores with the demo's sizes above (v-prediction tiny model)


DETECTORS = ("noise-magnitude", "seed-consistency")


def make_detector(name: str, seeds: Sequence[int]):
    """A detector by name: Wen et al.'s noise magnitude over ``seeds``, or NeMo's seed consistency."""
    from dori.detectors.nemo import SeedConsistency
    from dori.detectors.wen import NoiseMagnitude

    if name == "noise-magnitude":
        return NoiseMagnitude(seeds=seeds)
    if name == "seed-consistency":
        return SeedConsistency()
    raise DoriError(f"unknown detector {name!r}; detectors: {', '.join(DETECTORS)}")


def run_detection(pipe, records, store: ItemStore, seeds: Sequence[int] = (0, 1, 2, 3),
                  detectors: Sequence[str] = DETECTORS, nemo_threshold: float | None = None) -> list[dict]:
    """Every caption's score under each detector; AUROC and TPR at 1% FPR, memorized vs the rest.

    NeMo's seed consistency also reports the share of memorized and of other captions above
    ``nemo_threshold`` (default: the model's calibrated NeMo pairwise threshold, ``dori_defaults.json``;
    NeMo's 0.428 for other models).
    """
    from dori.detectors.wen import detection_metrics

    require_both_kinds(records)
    caps = [r.caption for r in records]
    labels = [r.memorized for r in records]
    thr = nemo_threshold if nemo_threshold is not None else \
        pipe.dori_method_defaults.get("nemo", {}).get("pairwise_threshold", 0.428)
    out = []
    for name in detectors:
        det = make_detector(name, seeds)
        key = store.key("detect", repr(det), caps, labels, thr, model_id(pipe), asdict(pipe.dori_defaults))
        res = store.get(key)
        if res is None:
            stored_only(f"{det.name} detection scores")
            scores = det.score(pipe, caps).tolist()
            res = {"name": det.name, "detector": repr(det),
                   "scores": [{"caption": c, "kind": r.kind, "memorized": r.memorized, "score": s}
                              for c, r, s in zip(caps, records, scores, strict=True)]}
            res |= detection_metrics(scores, labels)
            if name == "seed-consistency":
                above = {m: [s > thr for s, lab in zip(scores, labels, strict=True) if lab == m] for m in (True, False)}
                res |= {"threshold": thr, "flagged_memorized": statistics.fmean(above[True]),
                        "flagged_others": statistics.fmean(above[False])}
            store.put(key, res)
        out.append(res)
    return out


def require_both_kinds(records) -> None:
    """Detection compares memorized with other prompts: one clear error when a set lacks either."""
    kinds = {r.memorized for r in records}
    if len(kinds) < 2:
        raise DoriError("detection compares memorized with other prompts, but this prompt set has "
                        f"{'only' if True in kinds else 'no'} memorized ones: use a set with both (e.g. "
                        "NeMo's CSV with VM/TM rows plus non-memorized prompts)")


def check_method_params(method_params: dict[str, dict], stages: Sequence[str] | None = None) -> None:
    """One clear error for an unknown mitigation or parameter name, a value of the wrong type, or parameters
    for a mitigation that is not among ``stages`` (before any stage runs)."""
    import inspect

    from dori.analyses.runfile import check_types, type_hints
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.wanda import Wanda

    for name, params in method_params.items():
        cls = {"nemo": NeMo, "wanda": Wanda}.get(name)
        if cls is None:
            raise DoriError(f"unknown mitigation {name!r} in method parameters; known: nemo, wanda")
        if stages is not None and name not in stages:
            raise DoriError(f"parameters given for {name}, which this run does not use (stages: {', '.join(stages)})")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(params) - known
        if unknown:
            raise DoriError(f"{name} has no parameter {sorted(unknown)}; its parameters: {', '.join(sorted(known))}")
        check_types(params, type_hints(cls.__init__), "method parameters", f"{name}.")
        if "layer_group" in params:
            check_layer_group(params["layer_group"])
        try:  # the values (e.g. a sparsity above 1), before any model loads
            cls(**params)
        except (TypeError, ValueError) as e:
            raise DoriError(f"{name}: bad parameter value in {params}: {e}") from None


def make_method(name: str, pipe, stats_prompts: str | None, overrides: dict | None = None):
    """NeMo or Wanda with the model's shipped settings (``dori_defaults.json`` "methods"), if any, then
    ``overrides`` (e.g. ``{"sparsity": 0.1, "layer_group": "value"}``; names are checked by
    :func:`check_method_params`, values here)."""
    from dori.mitigations.nemo import NeMo
    from dori.mitigations.wanda import Wanda

    kwargs = {**pipe.dori_method_defaults.get(name, {}), **(overrides or {})}
    try:
        method = (Wanda if name == "wanda" else NeMo)(**kwargs)
    except (TypeError, ValueError) as e:
        raise DoriError(f"{name}: bad parameter value in {kwargs}: {e}") from None
    resolve_layers(pipe.unet, method.layer_group)  # an unknown layer group is one clear error, now
    if name == "wanda":
        return method
    nemo = method
    if stats_prompts:
        prompts = [r.caption for r in load_prompt_set(stats_prompts, default_kind="N") if not r.memorized]
    elif getattr(pipe, "dori_recipe", None) is not None:  # the tiny model, shipped or retrained
        from dori.data.tiny import spec_from_recipe, tiny_stats_prompts

        prompts = tiny_stats_prompts(spec=spec_from_recipe(pipe.dori_recipe))
    else:
        raise DoriError("NeMo needs non-memorized prompts for its activation statistics: pass "
                        "--stats-prompts FILE (e.g. NeMo's unmemorized_laion_prompts.csv or a .txt)")
    nemo.fit_statistics(pipe, prompts)
    return nemo


def make_attack(pipe, overrides: dict | None = None):
    """DoRI with the model's shipped settings (``dori_defaults.json`` "methods" -> "dori"), then overrides."""
    from dori.attacks.dori import DoRI

    return DoRI(**{**pipe.dori_method_defaults.get("dori", {}), **(overrides or {})})


def roc_plot(detection: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.6), dpi=110)
    for det in detection:
        ax.plot(det["roc"]["fpr"], det["roc"]["tpr"], lw=2,
                label=f"{det['name']}: AUROC {det['auroc']:.3f}, TPR@1%FPR {det['tpr_at_1pct_fpr']:.2f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("memorized vs all other captions", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    _save_fig(fig, path)


def default_metric(vae_class: str) -> str:
    """The metric of a model by its VAE's class name: pixel-ssim for a pixel-space model (the tiny one's
    ``PixelIdentityVAE``), SSCD-NeMo otherwise."""
    return "pixel-ssim" if vae_class == "PixelIdentityVAE" else "sscd-nemo"


def _default_metric_unloaded(model: str) -> str | None:
    """:func:`default_metric` told from the model's folder without loading it (the VAE class in
    ``model_index.json``); None for a hub id, or a folder without an index (told once it loads)."""
    from dori.models.loading import resolve_model_path

    try:
        index = Path(resolve_model_path(model)) / "model_index.json"
        return default_metric(json.loads(index.read_text())["vae"][1])
    except (DoriError, OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def check_metric(name: str | None, model: str, sscd_path: str | None = None) -> None:
    """The metric's settings, before the model loads: an unknown name (one error with a did-you-mean), or an
    SSCD metric (named, or the default of a latent model) without its weights file."""
    from dori.registry import METRICS

    if name is not None:
        METRICS.entry(name)
    if (name or _default_metric_unloaded(model) or "").startswith("sscd") and not (
            sscd_path and Path(sscd_path).expanduser().is_file()):
        make_metric(name or "sscd-nemo", None, sscd_path)  # its clear error: the flag, or the missing file


def make_metric(name: str | None, pipe, sscd_path: str | None = None):
    """The replication metric: pixel-ssim for pixel-space models (the tiny one), SSCD-NeMo otherwise."""
    from dori.registry import METRICS

    if name is None:
        name = default_metric(type(pipe.vae).__name__)
    cls = METRICS.get(name)
    if name.startswith("sscd"):
        if not sscd_path:
            raise DoriError(f"metric {name!r} needs a local SSCD TorchScript file: pass --sscd PATH "
                            "(dori never downloads it), or use --metric pixel-ssim")
        return cls(sscd_path)
    return cls()


def aggregate(samples: list[dict]) -> dict:
    """Replication per stage, setting and kind; the bypass's per budget too (its rows at 0 and 50 steps
    describe different images)."""
    groups = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            setting = f"{s['setting']}@{s['budget']}" if s["stage"] == "bypass" else s["setting"]
            groups[f"{s['stage']}/{setting}/{s['kind']}"].append(s)
    return {k: summarize(v) for k, v in groups.items()}


def procedural_accuracy(samples: list[dict]) -> dict | None:
    rows = [s["procedural"] for s in samples if "procedural" in s and s["setting"] == "none"]
    if not rows:
        return None
    out = {}
    for k in ("color", "shape", "background"):
        asked = [r[f"{k}_ok"] for r in rows if r[f"{k}_ok"] is not None]
        out[f"{k}_accuracy"] = sum(asked) / len(asked) if asked else None  # None: never named
    return out | {"all_accuracy": sum(r["ok"] for r in rows) / len(rows), "n_samples": len(rows)}


def score_histogram(samples: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            by_kind[s["kind"]].append(s["score"])
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    for kind, scores in sorted(by_kind.items()):
        ax.hist(scores, bins=30, range=(-0.2, 1.0), alpha=0.55, label=f"{kind} (n={len(scores)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("replication score (own reference; best reference match if none)")
    ax.set_ylabel("generations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _check_settings(seeds, stages, num_inference_steps, guidance_rescale, images_dir, attack) -> None:
    """The run's settings that can be checked before anything loads: one clear error each."""
    from dori.attacks.dori import DoRI

    if not seeds:
        raise DoriError("seeds: give at least one sampling seed (e.g. --seeds 0,1)")
    if not stages:
        raise DoriError(f"stages: give at least one of {', '.join(STAGES)}")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise DoriError(f"sampling steps must be 1 or more, got {num_inference_steps}")
    if guidance_rescale is not None and not 0 <= guidance_rescale <= 1:
        raise DoriError(f"guidance rescale must be between 0 and 1, got {guidance_rescale}")
    if images_dir and not Path(images_dir).expanduser().is_dir():
        raise DoriError(f"images folder {images_dir} not found (--images-dir)")
    if "bypass" in stages:  # DoRI's own value checks (its steps are the largest budget's, checked apart)
        try:
            DoRI(**{k: v for k, v in (attack or {}).items() if k != "steps"})
        except (TypeError, ValueError) as e:
            raise DoriError(f"attack: {e}") from None


def run_demo(
    model: str = "tiny",
    out: str | Path = "runs/demo",
    prompt_set: str = "tiny",
    seeds: tuple[int, ...] = DEMO_SEEDS,
    metric: str | None = None,
    sscd_path: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float | None = None,
    device: str = "cpu",
    images_dir: str | None = None,
    stages: Sequence[str] = DEFAULT_STAGES,
    stats_prompts: str | None = None,
    attack: dict | None = DEMO_ATTACK,
    budgets: Sequence[int] = DEMO_BUDGETS,
    attack_seed: int = 0,
    control_per_kind: int | None = 2,
    max_targets: int | None = DEMO_TARGETS,
    fidelity_per_kind: int | None = DEMO_FIDELITY_PER_KIND,
    token_variants: int = 1,
    method_params: dict[str, dict] | None = None,
    per_prompt_fidelity: bool = False,
    detectors: Sequence[str] = DETECTORS,
    early_stop: bool = False,
    masks: dict[str, str] | None = None,
    finetuned: dict[str, str] | None = None,
    control_prompts: str | None = None,
    control_images_dir: str | None = None,
    command: str = "dori demo",
) -> dict:
    """Run the demo and write ``out/results.json`` and ``out/report.html``; returns the results dict.

    Stages: ``generate`` (every caption x seeds), ``detect`` (``detectors``: noise magnitude over the
    run's seeds, NeMo's seed consistency; ROC), ``nemo`` / ``wanda`` (a mask per memorized caption,
    before/after table), ``bypass`` (DoRI against each
    mitigation run in this call, or against the model as it is when none is, with the non-memorized
    control: ``control_per_kind`` photos of each control kind (seen-once, held-out, N), None = all; the
    random-perturbation baseline; ``token_variants`` word-perturbed prompts per target, the discrete
    baseline).
    ``max_targets``: the mitigation and bypass stages take the first this many memorized captions (None =
    all); ``fidelity_per_kind``: the mitigations' effect on non-memorized captions is measured on the
    first this many of each kind (None = all). ``per_prompt_fidelity`` also generates each non-memorized
    caption under one memorized caption's own mask (besides the joint mask). ``method_params`` overrides
    a mitigation's parameters (``{"wanda": {"sparsity": 0.1}}``) and ``attack`` DoRI's (default: the
    model's shipped settings); ``budgets`` is the cost-curve ladder (the attack runs ``max(budgets)``
    steps); ``attack_seed`` seeds DoRI's (noise, timestep) draws and the baselines' perturbations (repeat
    a run with other seeds, each in its own folder, for the spread of the bypass numbers). ``early_stop``
    freezes each trigger once one image it generates (a sampling seed outside ``seeds``) replicates its
    target (off by default, as when reproducing the paper; see ``run_bypass``).
    ``masks``: mitigations given as saved masks, ``{name: path}`` (a folder of per-caption masks or one
    mask for every caption, :class:`~dori.mitigations.masks.SavedMasks`): each gets the before/after table
    of NeMo and Wanda and, with the bypass stage, is attacked like them (rows ``<name>``, ``<name>+dori``).
    ``finetuned``: mitigations given as fine-tuned UNets of the model, ``{name: path}`` (a pipeline folder,
    a UNet folder or a UNet safetensors file, :class:`~dori.mitigations.finetuned.FineTunedUNet`): the
    weights that differ are swapped in like a mask, and measured and attacked like the saved masks.
    ``control_prompts`` (with ``control_images_dir``): non-memorized images attacked as the bypass's control
    (:func:`~dori.data.prompts.load_control_set`), for a prompt set that has none (SD's memorized prompts);
    they serve the bypass only, and come before the prompt set's own control photos of the same kind when
    ``control_per_kind`` takes the first few. The bypass stage refuses to run without a control.

    A killed run started again with the same arguments reuses the items it had finished. Started by
    ``accelerate launch`` or ``torchrun``, the processes share the work (:mod:`dori.analyses.distributed`):
    each returns every row and table; the first writes results.json, the plots and the report.
    """
    from dori.registry import MODELS, PROMPT_SETS

    t0 = time.time()
    out = Path(out)
    # local paths recorded absolute: `dori run OUT` resumes from any directory, with the same item keys
    model, images_dir, sscd_path = absolute_path(model, MODELS), absolute_path(images_dir), absolute_path(sscd_path)
    prompt_set, stats_prompts, control_prompts = (absolute_path(p, PROMPT_SETS)
                                                  for p in (prompt_set, stats_prompts, control_prompts))
    control_images_dir = absolute_path(control_images_dir)
    masks = masks and {name: absolute_path(path, exists=lambda p: p.exists() or mask_files(p)[1].is_file())
                       for name, path in masks.items()}  # a mask may be named without its suffix
    finetuned = finetuned and {name: absolute_path(path) for name, path in finetuned.items()}
    config = dict(model=str(model), prompt_set=str(prompt_set), seeds=list(seeds), metric=metric,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  guidance_rescale=guidance_rescale, device=device, stages=list(stages), stats_prompts=stats_prompts,
                  attack=attack, budgets=list(budgets), attack_seed=attack_seed,
                  control_per_kind=control_per_kind, max_targets=max_targets, fidelity_per_kind=fidelity_per_kind,
                  token_variants=token_variants,
                  method_params=method_params, per_prompt_fidelity=per_prompt_fidelity, detectors=list(detectors),
                  images_dir=images_dir and str(images_dir), sscd_path=sscd_path and str(sscd_path),
                  early_stop=early_stop, masks=masks, finetuned=finetuned, control_prompts=control_prompts,
                  control_images_dir=control_images_dir)
    man = manifest(command, config, seeds)
    check_method_params(method_params or {}, stages)
    for name in detectors:
        make_detector(name, seeds)  # an unknown detector fails here, before the model loads
    for name, n in (("max_targets", max_targets), ("fidelity_per_kind", fidelity_per_kind)):
        if n is not None and n < 1:
            raise DoriError(f"{name} must be 1 or more (None: all), got {n}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise DoriError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    after = sorted({"nemo", "wanda", "bypass"} & set(stages)) + (["masks (saved masks)"] if masks else []) \
        + (["finetuned (fine-tuned UNets)"] if finetuned else [])
    if after and "generate" not in stages:
        raise DoriError(f"{', '.join(after)} compare with the unmitigated images: add 'generate' to the stages")
    records = load_prompt_set(prompt_set, images_dir)  # validate cheap inputs before loading the model
    if control_images_dir and not control_prompts:
        raise DoriError("--control-images-dir is the folder of --control-prompts' images: give both")
    if control_per_kind is not None and control_per_kind < 0:
        raise DoriError(f"control_per_kind must be 0 or more (None: all), got {control_per_kind}")
    check_device(device)
    _check_settings(seeds, stages, num_inference_steps, guidance_rescale, images_dir, attack)
    if "generate" in stages:  # the metric (detection alone needs none), checked before the model loads
        check_metric(metric, model, sscd_path)
    if "bypass" in stages and (not budgets or min(budgets) < 0):
        raise DoriError(f"budgets must be DoRI step counts, 0 or more, at least one; got {list(budgets)}")
    if "nemo" in stages and stats_prompts:
        load_prompt_set(stats_prompts, default_kind="N")  # read now: a bad file fails before the model loads
    # the control prompts serve the bypass only: not generated, detected or used for the mitigations' side effects
    control_set = load_control_set(control_prompts, control_images_dir, records) if control_prompts else []
    if control_set and "bypass" not in stages:
        log.warning("the control prompts serve the bypass stage only, which this run does not have")
    targets = attack_targets(records, max_targets)
    control = []
    if after:
        from dori.analyses.bypass import control_records

        if not targets:
            memorized = [r for r in records if r.memorized]
            why = (f"none of its {len(memorized)} memorized prompts has its reference image on disk (check "
                   "--images-dir)" if memorized else
                   f"it has no memorized prompt (its kinds: {', '.join(sorted({r.kind for r in records}))})")
            raise DoriError(f"{', '.join(after)} need memorized prompts with a reference image, and in the prompt "
                            f"set {prompt_set} {why}")
        control = control_records(control_set + records, control_per_kind)  # the control prompts first
        if "bypass" in stages and not control:
            why = "control_per_kind is 0" if control_per_kind == 0 else (
                "the prompt set has no non-memorized prompt with a reference image (kinds seen_once, held_out, N)")
            raise DoriError("the bypass benchmark attacks a non-memorized control as well (an attack that forces "
                            f"any image is no evidence of retention), and this run has none ({why}). Give some with "
                            "--control-prompts FILE --control-images-dir DIR (e.g. NeMo's "
                            "unmemorized_laion_prompts.csv and its images), or leave the bypass out of --stages")
        require_unique_captions(targets + control)
    saved: list[SavedMasks | FineTunedUNet] = []
    for name, path in (finetuned or {}).items():
        saved.append(FineTunedUNet(name, path, taken={sm.name for sm in saved}))
    for name, path in (masks or {}).items():
        saved.append(SavedMasks(name, path, taken={sm.name for sm in saved}))
        saved[-1].require([r.caption for r in targets])
        written = [*(sm.name for sm in saved), *({"nemo", "wanda"} & set(stages))]  # this run's mask folders
        if any(Path(path).resolve().is_relative_to((out / "masks" / w).resolve()) for w in written):
            raise DoriError(f"mask set {name!r}: {path} is a mask folder this run writes; copy the masks "
                            "elsewhere or write the run to another --out")
    make_out_dir(out, "the run directory ")  # only now: a run refused above leaves no folder behind
    shard = Shard.from_env(device)
    man["processes"] = shard.world
    if shard.main:
        write_run_file(out, {"out": str(out), **config})  # `dori run OUT` resumes this run after a kill
    both = len({r.memorized for r in records}) == 2
    if list(stages) == ["detect"]:
        require_both_kinds(records)
    pipe = load_pipeline(model, device=shard.device(device))
    for sm in saved:  # masks or fine-tunes that do not fit this model fail now, before any image is generated
        sm.check(pipe, [r.caption for r in targets])
    if "nemo" in stages and not stats_prompts and getattr(pipe, "dori_recipe", None) is None \
            and tuple(stages) == DEFAULT_STAGES:
        log.warning("NeMo skipped: on this model it needs non-memorized prompts for its activation "
                    "statistics; pass --stats-prompts FILE (or --stages without nemo)")
        stages = [s for s in stages if s != "nemo"]
        config["stages"] = list(stages)
    # detection alone generates no image and needs no replication metric (nor an SSCD file)
    m = make_metric(metric, pipe, sscd_path) if "generate" in stages else None
    methods = {name: make_method(name, pipe, stats_prompts, (method_params or {}).get(name))
               for name in ("nemo", "wanda") if name in stages}  # bad parameter values fail here, early
    d = pipe.dori_defaults
    gen = dict(num_inference_steps=num_inference_steps or d.num_inference_steps,
               guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
               guidance_rescale=d.guidance_rescale if guidance_rescale is None else guidance_rescale)
    config.update(resolved_generation=gen, metric=m and m.name, threshold=m and m.threshold)
    missing = [r for r in records if r.reference_status == "missing"]
    if missing:
        log.warning("%d prompts have no reference image on disk (reported in results.json, not replaced): %s",
                    len(missing), "; ".join(r.caption[:40] for r in missing[:5]))
    from dori.analyses.replication import evaluate_replication

    store = ItemStore(out)
    samples = evaluate_replication(pipe, records, seeds, m, out, store=store, gen_kwargs=gen, shard=shard) \
        if "generate" in stages else []
    scored = any(s["score"] is not None for s in samples)
    if samples and not scored and shard.main:
        log.warning("no caption of this prompt set has a reference image on disk, so none of the %d generations "
                    "was scored (they are in %s)%s", len(samples), out / "images",
                    "; check --images-dir" if missing else "")
    results = {
        "schema_version": SCHEMA_VERSION,
        "manifest": man,
        "metric": {"name": m.name, "threshold": m.threshold,
                   "distractors": bool(getattr(m, "distractors", False))} if m else None,
        "prompts": [r.to_dict() for r in records] + [r.to_dict() | {"control": True} for r in control_set],
        "samples": samples,
        "plots": [{"title": "Replication scores by kind", "path": "plots/scores.png"}] if scored else [],
    }
    if "detect" in stages and not both:
        log.warning("detection skipped: it compares memorized with other prompts and this set has only one kind")
    elif "detect" in stages:
        thr = (method_params or {}).get("nemo", {}).get("pairwise_threshold")
        results["detection"] = [det for got in shard.each(list(detectors), lambda name: run_detection(
            pipe, records, store, seeds, [name], thr)) for det in got]
        if shard.main:
            roc_plot(results["detection"], out / "plots" / "roc.png")
            results["plots"].append({"title": "Detection ROC", "path": "plots/roc.png"})
    mitigations = {}
    for method in [*methods.values(), *saved]:  # NeMo, Wanda, then fine-tunes and masks made elsewhere, alike
        plain = [s for s in samples if s["stage"] == "generate"]  # not another mitigation's rows
        res = run_mitigation(pipe, method, records, seeds, m, out, gen, plain, per_prompt_fidelity,
                             max_targets, fidelity_per_kind, shard)
        samples += res["samples"]
        mitigations[method.name] = {"summary": res["summary"], "table": res["table"], "masks": res["masks"]}
    if "bypass" in stages:
        from dori.analyses.bypass import (
            bypass_table,
            early_stop_info,
            plot_bypass,
            run_bypass,
            trigger_seconds,
        )

        dori = make_attack(pipe, {**(attack or {}), "steps": max(budgets)})  # what run_bypass runs and records
        config["resolved_attack"] = dori.params() | ({"check_every": dori.check_every} if early_stop else {})
        masks = {name: mres["masks"] for name, mres in mitigations.items()} or {"none": None}
        rows = run_bypass(pipe, records, masks, m, out, attack=dori, budgets=budgets, seeds=seeds, gen_kwargs=gen,
                          control=control, max_targets=max_targets,
                          token_variants=token_variants, seed=attack_seed, prior_rows=samples, early_stop=early_stop,
                          shard=shard)
        samples += rows
        results["bypass"] = bypass_table(samples, budgets) | {"attack": repr(dori), "early_stop": None}
        if early_stop:  # the triggers stopped early: say so wherever the numbers are shown
            info = results["bypass"]["early_stop"] = early_stop_info(dori, m, gen, seeds)
            results["bypass"]["attack"] += (f", early stop (check every {info['check_every']} steps at sampling "
                                            f"seed {info['seed']}; a frozen trigger stands for later budgets)")
        man["attack_timing"] = trigger_seconds(out, rows)  # wall time: a fact of this run, kept with the manifest
        if shard.main:
            results["plots"] += plot_bypass(results["bypass"], samples, m.threshold, out / "plots")
    for mres in mitigations.values():
        del mres["masks"]  # saved under masks/; results.json keeps the tables
    if mitigations:
        results["mitigations"] = mitigations
    results["aggregates"] = aggregate(samples)
    proc = procedural_accuracy(samples)
    if proc:
        results["procedural"] = proc
    man["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    man["seconds"] = round(time.time() - t0, 1)
    if shard.main:
        if scored:
            score_histogram(samples, m.threshold, out / "plots" / "scores.png")
        write_json(out / "results.json", results)
        render_report(out)
    return results
