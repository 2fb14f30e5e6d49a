"""The ``dori`` command line: a thin shell over the Python functions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dori.analyses.runfile import RUN_DEFAULTS
from dori.errors import DoriError

app = typer.Typer(add_completion=False, rich_markup_mode="markdown", no_args_is_help=True,  # help paragraphs reflowed
                  help="dori: does this diffusion model still retain its memorized training images?")
zoo = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                  help="Build the embedded tiny model and its pieces.")
app.add_typer(zoo, name="zoo")
console = Console(stderr=True, soft_wrap=True)


def _say(*objects, **kwargs) -> None:
    """Print to stdout as written: captions, mask names and paths may hold brackets that rich would read as
    its markup (``[attack]``, ``dori[parquet]``) and drop."""
    Console(markup=False, soft_wrap=True).print(*objects, **kwargs)  # paths unbroken; tables still fit


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _ints(text: str, option: str = "--seeds") -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DoriError(f"{option} must be comma-separated integers, got {text!r}") from None


def _method_params(items: list[str] | None) -> dict[str, dict]:
    """``["wanda.sparsity=0.1", "nemo.layer_group=value"]`` -> ``{"wanda": {"sparsity": 0.1}, ...}``;
    values are read as JSON when they parse (numbers, lists, true/false), else kept as text."""
    import json

    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or method not in ("nemo", "wanda") or not name:
            raise DoriError(f"--param takes METHOD.KEY=VALUE with METHOD nemo or wanda "
                            f"(e.g. wanda.sparsity=0.1), got {item!r}")
        try:
            out.setdefault(method, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(method, {})[name] = value
    return out


def _named_paths(items: list[str], flag: str = "--masks", example: str = "mine=runs/a/masks/wanda") -> dict[str, str]:
    """``["mine=runs/a/masks/wanda"]`` -> ``{"mine": "runs/a/masks/wanda"}``."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DoriError(f"{flag} takes NAME=PATH (e.g. {flag} {example}), got {item!r}")
        if name in out:
            raise DoriError(f"{flag} names {name!r} twice: give each its own name")
        out[name] = path
    return out


PARAM_HELP = "mitigation parameter METHOD.KEY=VALUE, repeatable (e.g. wanda.sparsity=0.1, wanda.layer_group=value)"
CONTROL_HELP = ("non-memorized prompts with reference images, the bypass's control for a prompt set without one "
                "(e.g. NeMo's unmemorized_laion_prompts.csv)")
CONTROL_IMAGES_HELP = "folder with the control prompts' reference images"


@app.command()
def demo(
    out: Path = typer.Option(..., help="run directory (results.json, report.html, images)"),
    model: str = typer.Option("tiny", help="'tiny', a local diffusers folder, or a cached hub id"),
    prompts: str = typer.Option("tiny", help="prompt set name or file (.csv NeMo, .jsonl Wen, .parquet, .txt)"),
    images_dir: str = typer.Option(None, help="folder with the prompt set's reference images"),
    seeds: str = typer.Option("0,1", help="comma-separated seeds"),
    metric: str = typer.Option(None, help="pixel-ssim (default for tiny), sscd-nemo, sscd-wen"),
    sscd: str = typer.Option(None, help="local SSCD TorchScript file for sscd-* metrics"),
    steps: int = typer.Option(None, help="sampling steps (default: the model's)"),
    guidance: float = typer.Option(None, help="guidance scale (default: the model's)"),
    guidance_rescale: float = typer.Option(None, help="diffusers' guidance rescale, 0-1 (default: the model's; "
                                           "0 for models without a dori_defaults.json)"),
    device: str = typer.Option("cpu"),
    stages: str = typer.Option("generate,detect,nemo,wanda,bypass",
                               help="comma-separated stages: generate, detect, nemo, wanda, bypass"),
    targets: int = typer.Option(None, help="memorized captions mitigated and attacked, the first N (0 = all; "
                                "default: the demo's 3)"),
    fidelity_per_kind: int = typer.Option(None, help="non-memorized captions of each kind generated under the "
                                          "mitigations to measure their side effect (0 = all; default: the demo's 4)"),
    budgets: str = typer.Option("0,10,50", help="DoRI budgets (steps) of the bypass stage's cost curve"),
    pairs: int = typer.Option(4, help="DoRI's (noise, timestep) pairs per step in the bypass stage (paper: 8)"),
    stats_prompts: str = typer.Option(None, help="non-memorized prompts for NeMo's statistics (non-tiny models)"),
    param: list[str] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    per_prompt_fidelity: bool = typer.Option(False, help="also generate each non-memorized caption under one "
                                             "memorized caption's own mask (besides the joint mask)"),
    control_prompts: str = typer.Option(None, help=CONTROL_HELP),
    control_images_dir: str = typer.Option(None, help=CONTROL_IMAGES_HELP),
):
    """Generate every caption over several seeds, measure replication, detect memorized prompts, mitigate
    them (NeMo, Wanda) and attack the mitigations with DoRI; write results.json and report.html."""
    sizes = {k: v or None for k, v in (("max_targets", targets), ("fidelity_per_kind", fidelity_per_kind))
             if v is not None}  # unset: run_demo's DEMO_TARGETS / DEMO_FIDELITY_PER_KIND; 0: all
    res = _run_demo(model=model, out=out, prompt_set=prompts, seeds=_ints(seeds), metric=metric,
                    sscd_path=sscd, num_inference_steps=steps, guidance_scale=guidance,
                    guidance_rescale=guidance_rescale, device=device, images_dir=images_dir, stages=_list(stages),
                    stats_prompts=stats_prompts,
                    budgets=_ints(budgets, "--budgets"), attack=dict(pairs=pairs),
                    method_params=_method_params(param), per_prompt_fidelity=per_prompt_fidelity,
                    control_prompts=control_prompts, control_images_dir=control_images_dir, **sizes)
    _print_results(res, out)


def _run_demo(**kwargs) -> dict:
    """`run_demo`, imported only now: its arguments, parsed by the caller, fail first if they are bad, without
    waiting seconds for torch and diffusers."""
    from dori.analyses.demo import run_demo

    return run_demo(**kwargs)


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _print_results(res: dict, out: Path) -> None:
    from dori.analyses.distributed import Shard

    if not Shard.from_env().main:  # started by accelerate launch / torchrun: the first process prints
        return
    if res["aggregates"]:
        _print_replication(res)
    _print_analyses(res, out)


def _print_replication(res: dict) -> None:
    table = Table(title=f"replication ({res['metric']['name']}, threshold {res['metric']['threshold']})")
    for col in ("stage/setting/kind", "images", "score mean ± std", "MR"):
        table.add_column(col, overflow="fold")  # long names fold, never cut
    for k, v in res["aggregates"].items():
        table.add_row(k, str(v["n_images"]), f"{v['score_mean']:.3f} ± {v['score_std']:.3f}", f"{v['mr']:.2f}")
    _say(table)


def _short(caption: str, n: int = 40) -> str:
    return caption if len(caption) <= n else caption[: n - 1] + "…"


def _print_analyses(res: dict, out: Path) -> None:
    from dori.reports.html import similarity

    if "procedural" in res:
        p = res["procedural"]
        bg = "" if p["background_accuracy"] is None else f"background {p['background_accuracy']:.2f}, "
        _say(f"procedural captions: colour {p['color_accuracy']:.2f}, shape {p['shape_accuracy']:.2f}, "
             f"{bg}all named attributes {p['all_accuracy']:.2f}")
    for d in res.get("detection", []):
        line = f"detection ({d['name']}): AUROC {d['auroc']:.3f}, TPR@1%FPR {d['tpr_at_1pct_fpr']:.2f}"
        if "threshold" in d:
            line += (f"; above threshold {d['threshold']}: memorized {d['flagged_memorized']:.2f}, "
                     f"others {d['flagged_others']:.2f}")
        _say(line)
    for name, mres in res.get("mitigations", {}).items():
        sm = mres["summary"]
        fid = sm["non_memorized_similarity_to_unmitigated"]
        own = sm.get("non_memorized_similarity_per_prompt_mask")
        if sm.get("mask_kind") == "patch":
            _say(f"{name}: memorized MR {sm['mr_before']:.2f} -> {sm['mr_after']:.2f} (fine-tuned UNet, "
                 f"{sm['joint_mask_size']} weights changed); non-memorized similarity to unmitigated {similarity(fid)}")
            continue
        _say(f"{name}: memorized MR {sm['mr_before']:.2f} -> {sm['mr_after']:.2f}; joint mask "
             f"{sm['joint_mask_size']}; non-memorized similarity to unmitigated {similarity(fid)} "
             f"(joint mask)" + (f", {similarity(own)} (one prompt's own mask)" if own else ""))
    if "bypass" in res:
        b = res["bypass"]
        table = Table(title=f"bypass benchmark: {b['attack']}")
        for col in ("setting", "images", "MR", "MR any seed", "score mean ± std"):
            table.add_column(col, overflow="fold")
        for r in b["table"]:
            table.add_row(r["setting"], str(r["n_images"]), f"{r['mr']:.2f}", f"{r['mr_any_seed']:.2f}",
                          f"{r['score_mean']:.3f} ± {r['score_std']:.3f}")
        _say(table)
        from dori.data.prompts import MEMORIZED_KINDS

        for label in dict.fromkeys(r["setting"] for r in b["table"] if "+ DoRI" in r["setting"]):
            for control, what in ((False, "not brought back"), (True, "forced")):  # targets left out, control forced
                named = [f"{_short(i['caption'])} ({c['replicated']}/{c['generations']}, best {c['score_max']:.2f})"
                         for i in b.get("per_image", []) if (i["kind"] not in MEMORIZED_KINDS) == control
                         and (c := i["cells"].get(label)) and (c["replicated"] > 0) == control]
                if named:
                    _say(f"{label}, {what}: " + " | ".join(named))
        for label, c in b["curves"].items():
            _say(f"MR vs steps, {label}: " + ", ".join(f"{s}: {v:.2f}" for s, v in
                                                      zip(c["budget"], c["mr"], strict=True)))
        t = res["manifest"]["attack_timing"]
        if t["n"]:
            _say(f"attack time per target image: {t['mean_seconds_per_image']:.1f} s (n={t['n']})")
    _say(f"wrote {out / 'results.json'} and {out / 'report.html'} in {res['manifest']['seconds']:.0f} s")


@app.command()
def detect(
    out: Path = typer.Option(..., help="run directory (results.json, report.html with the ROC)"),
    model: str = typer.Option("tiny", help="'tiny', a local diffusers folder, or a cached hub id"),
    prompts: str = typer.Option("tiny", help="prompt set name or file; memorized = its VM/TM/memorized rows"),
    images_dir: str = typer.Option(None),
    seeds: str = typer.Option("0,1,2,3", help="seeds of the noise-magnitude detector"),
    detectors: str = typer.Option(",".join(("noise-magnitude", "seed-consistency")),
                                  help="comma-separated: noise-magnitude (Wen et al.), seed-consistency (NeMo)"),
    device: str = typer.Option("cpu"),
):
    """Score every caption with the memorization detectors: per-prompt scores, AUROC and TPR at 1% FPR
    (memorized vs the rest) in results.json, the ROC in report.html. No image is generated."""
    res = _run_demo(model=model, out=out, prompt_set=prompts, seeds=_ints(seeds), device=device,
                    images_dir=images_dir, stages=["detect"], detectors=_list(detectors), command="dori detect")
    _print_results(res, out)


@app.command()
def attack(
    out: Path = typer.Option(..., help="run directory"),
    mitigation: str = typer.Option(None, help="comma-separated: nemo, wanda; 'none' attacks the model as it "
                                              "is. Default: wanda, or none with --masks or --finetuned"),
    masks: list[str] = typer.Option(None, "--masks", help="NAME=PATH, repeatable: attack masks saved earlier, a "
                                                          "folder of per-caption masks (DIR/masks/wanda of a run) "
                                                          "or one mask file for every caption"),
    finetuned: list[str] = typer.Option(None, "--finetuned", help="NAME=PATH, repeatable: attack a fine-tuned UNet of "
                                                                  "--model (a pipeline folder, a UNet folder or "
                                                                  "its .safetensors file) as a mitigation; the rest "
                                                                  "stays on --model"),
    model: str = typer.Option("tiny"),
    prompts: str = typer.Option("tiny", help="prompt set name or file"),
    images_dir: str = typer.Option(None),
    seeds: str = typer.Option(_csv(RUN_DEFAULTS["seeds"])),
    budgets: str = typer.Option(_csv(RUN_DEFAULTS["budgets"]), help="cost-curve ladder of attack steps"),
    lr: float = typer.Option(None, help="Adam learning rate (default: the model's setting)"),
    pairs: int = typer.Option(None, help="(noise, timestep) pairs per step (default 8)"),
    restarts: int = typer.Option(None, help="independent triggers per target; the lowest final loss is kept"),
    init: str = typer.Option(None, help="prompt (default), random"),
    control: int = typer.Option(None, help="control photos per kind (seen-once, held-out, N); default: all"),
    token_variants: int = typer.Option(RUN_DEFAULTS["token_variants"],
                                       help="word-perturbed prompts per target (the discrete baseline)"),
    attack_seed: int = typer.Option(0, help="seed of DoRI's noise/timestep draws and of the baselines; rerun "
                                            "with others (each in its own --out) for the spread"),
    param: list[str] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    early_stop: bool = typer.Option(False, help="freeze a trigger once one image it generates (a sampling seed "
                                                "outside --seeds) replicates its target; off, as in the paper"),
    metric: str = typer.Option(None),
    sscd: str = typer.Option(None),
    stats_prompts: str = typer.Option(None, help="non-memorized prompts for NeMo's statistics (non-tiny models)"),
    control_prompts: str = typer.Option(None, help=CONTROL_HELP),
    control_images_dir: str = typer.Option(None, help=CONTROL_IMAGES_HELP),
    device: str = typer.Option("cpu"),
):
    """The bypass benchmark: mitigate, then attack each memorized image with DoRI through the mitigation;
    the non-memorized control is attacked with the same budget on the unmitigated model."""
    saved = _named_paths(masks or [])
    tuned = _named_paths(finetuned or [], "--finetuned", "ablated=models/sd-ablated")
    given = _list(mitigation) if mitigation else [] if saved or tuned else ["wanda"]
    if "none" in given and (len(given) > 1 or saved or tuned):
        raise DoriError("--mitigation none attacks the model as it is, alone: drop it, or the other mitigations, "
                        "--masks and --finetuned (the non-memorized control is attacked on the model as it is in "
                        "every run)")
    mits = [m for m in given if m != "none"]
    bad = set(mits) - {"nemo", "wanda"}
    if bad:
        raise DoriError(f"--mitigation takes nemo, wanda or none, got {sorted(bad)}")
    overrides = {k: v for k, v in dict(lr=lr, pairs=pairs, restarts=restarts, init=init).items() if v is not None}
    res = _run_demo(model=model, out=out, prompt_set=prompts, seeds=_ints(seeds), metric=metric, sscd_path=sscd,
                    device=device, images_dir=images_dir, stages=["generate", *mits, "bypass"],
                    stats_prompts=stats_prompts, attack=overrides, budgets=_ints(budgets, "--budgets"),
                    attack_seed=attack_seed, control_per_kind=control, token_variants=token_variants,
                    method_params=_method_params(param), early_stop=early_stop, masks=saved or None,
                    finetuned=tuned or None,
                    control_prompts=control_prompts, control_images_dir=control_images_dir, command="dori attack",
                    **{k: RUN_DEFAULTS[k] for k in ("per_prompt_fidelity", "max_targets", "fidelity_per_kind")})
    _print_results(res, out)


@app.command()
def finetune(
    out: Path = typer.Option(..., help="folder for the fine-tuned UNet (OUT/unet) and its record"),
    model: str = typer.Option("tiny"),
    prompts: str = typer.Option("tiny", help="prompt set name or file: its memorized captions are fine-tuned against"),
    images_dir: str = typer.Option(None),
    targets: int = typer.Option(None, help="the first N memorized captions (default: all)"),
    surrogate: str = typer.Option("wanda", help="wanda or nemo: the pruning whose image from each memorized "
                                                "prompt is what it is steered to"),
    epochs: int = typer.Option(5, help="epochs, each with fresh DoRI triggers against the current weights"),
    steps: int = typer.Option(50, help="Adam steps per epoch"),
    lr: float = typer.Option(1e-4, help="Adam learning rate"),
    batch: int = typer.Option(8, help="images per loss term and step"),
    keep_prompts: str = typer.Option(None, help="ordinary captions with images that keep the model's utility "
                                                "(default for the tiny model: its own non-memorized training pairs)"),
    keep_images_dir: str = typer.Option(None, help="folder with the keep prompts' images"),
    stats_prompts: str = typer.Option(None, help="non-memorized prompts for NeMo's statistics (non-tiny models)"),
    param: list[str] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    metric: str = typer.Option(None, help="the replication metric that tells a surrogate from a copy"),
    sscd: str = typer.Option(None),
    seed: int = typer.Option(0, help="first sampling seed of the surrogates; seed of DoRI's draws and the "
                                     "fine-tuning's"),
    device: str = typer.Option("cpu"),
):
    """Adversarial fine-tuning (PAPER.md section 8), the mitigation that does not assume locality: each epoch
    finds fresh DoRI triggers against the current weights and steers them, and the original prompts, to a
    surrogate image, while ordinary pairs keep the model's utility. Writes OUT/unet; audit it with
    `dori attack --finetuned NAME=OUT/unet`. A killed run resumes after its last finished epoch."""
    import shlex

    from dori.analyses.finetune import run_finetune

    res = run_finetune(out, model=model, prompt_set=prompts, images_dir=images_dir, surrogate=surrogate,
                       max_targets=targets, keep_prompts=keep_prompts, keep_images_dir=keep_images_dir,
                       epochs=epochs, steps=steps, lr=lr, batch=batch, method_params=_method_params(param),
                       stats_prompts=stats_prompts, metric=metric, sscd_path=sscd, seed=seed, device=device)
    moved = [f"{s['caption'][:40]} (seed {s['seed']}{', a copy' if s['replicates'] else ''})"
             for s in res["surrogates"] if s["seed"] != seed or s["replicates"]]
    _say(f"surrogates: {len(res['surrogates'])} generations of the pruned model"
         + (f"; where the first seeds drew a copy: {' | '.join(moved)}" if moved else ", none a copy"))
    for e in res["epochs"]:
        loss = e["dori_final_loss"]
        _say(f"epoch {e['epoch']}: DoRI's final loss {'-' if loss is None else f'{loss:.4f}'}, "
             f"L_adv {e['loss_adv']:.4f}, L_DM {e['loss_dm']:.4f} ({e['seconds']} s)")
    _say(f"wrote {res['unet']} ({len(res['targets'])} memorized captions, {res['keep_pairs']} ordinary pairs kept) "
         f"in {res['manifest']['seconds']} s; audit it: dori attack --model {shlex.quote(model)} --prompts "
         f"{shlex.quote(prompts)} --finetuned adversarial={shlex.quote(str(res['unet']))}")


@app.command()
def locality(
    out: Path = typer.Option(..., help="folder for locality.json, the triggers, the masks and the plot"),
    model: str = typer.Option("tiny"),
    prompts: str = typer.Option("tiny", help="prompt set name or file: its memorized images are analysed"),
    images_dir: str = typer.Option(None),
    targets: int = typer.Option(3, help="the first N memorized images (0: all)"),
    starts: int = typer.Option(8, help="random N(0, I) starts per image (the paper: 100)"),
    steps: int = typer.Option(50, help="DoRI steps from each start"),
    methods: str = typer.Option("nemo,wanda", help="prunings run from each trigger (comma-separated; '' for none)"),
    seeds: str = typer.Option("0,1", help="sampling seeds a trigger must replicate at to be kept"),
    control: int = typer.Option(1, help="non-memorized images per control kind, attacked the same way (0: none)"),
    layer_group: str = typer.Option(None, help="the activations' layers (default: NeMo's layer group)"),
    attack_seed: int = typer.Option(0, help="seed of the starts and of DoRI's draws"),
    param: list[str] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
    metric: str = typer.Option(None),
    sscd: str = typer.Option(None),
    stats_prompts: str = typer.Option(None, help="non-memorized prompts for NeMo's statistics (non-tiny models)"),
    device: str = typer.Option("cpu"),
):
    """The locality analyses (PAPER.md section 7): DoRI from many random starts per memorized image on the
    model as it is; how far apart the triggers lie, how their activations differ, and whether NeMo and Wanda
    run from each trigger prune the same weights. A killed run started again resumes."""
    from dori.analyses.locality import run_locality, summary_lines

    res = run_locality(out, model=model, prompt_set=prompts, images_dir=images_dir, max_targets=targets or None,
                       starts=starts, steps=steps, methods=_list(methods), seeds=_ints(seeds), seed=attack_seed,
                       method_params=_method_params(param), stats_prompts=stats_prompts, metric=metric,
                       sscd_path=sscd, layer_group=layer_group, control=control, device=device)
    for line in summary_lines(res):
        _say(line)
    _say(f"wrote {out / 'locality.json'} and {out / res['plot']} in {res['manifest']['seconds']} s")


@app.command()
def run(
    path: Path = typer.Argument(..., help="a TOML or JSON run file, a run directory (resumes it) or a results.json "
                                          "(repeats that run)"),
    out: Path = typer.Option(None, help="run directory (default: the file's 'out', or the run directory given)"),
):
    """Run the stages a run file names: for long studies, and to resume or repeat a recorded run.

    A run file's keys are the arguments of `dori.analyses.demo.run_demo` (docs/results.md, run files); keys
    it leaves out take `dori attack`'s defaults (the paper's settings, every caption) and all five stages.
    Every run writes its arguments to DIR/run.json before it starts, so `dori run DIR` resumes a killed
    run of `dori demo`, `detect`, `mitigate` or `attack`."""
    from dori.analyses.runfile import load_run_file

    args = load_run_file(path, out)
    res = _run_demo(**args, command="dori run")
    _print_results(res, Path(args["out"]))


@app.command()
def mitigate(
    method: str = typer.Option(..., help="nemo or wanda"),
    out: Path = typer.Option(..., help="run directory"),
    model: str = typer.Option("tiny"),
    prompts: str = typer.Option("tiny", help="prompt set name or file"),
    images_dir: str = typer.Option(None),
    seeds: str = typer.Option("0,1,2,3"),
    metric: str = typer.Option(None),
    sscd: str = typer.Option(None),
    stats_prompts: str = typer.Option(None, help="non-memorized prompts for NeMo's statistics (non-tiny models)"),
    device: str = typer.Option("cpu"),
    param: list[str] = typer.Option(None, "--param", "-p", help=PARAM_HELP),
):
    """Localize a mask per memorized prompt with NeMo or Wanda, save the masks, and write the before/after
    table (results.json, report.html). The same run as `dori demo --stages generate,<method> --targets 0
    --fidelity-per-kind 0 --per-prompt-fidelity`."""
    if method not in ("nemo", "wanda"):
        raise DoriError(f"--method must be 'nemo' or 'wanda', got {method!r}")
    demo(out=out, model=model, prompts=prompts, images_dir=images_dir, seeds=seeds, metric=metric, sscd=sscd,
         steps=None, guidance=None, guidance_rescale=None, device=device, stages=f"generate,{method}",
         stats_prompts=stats_prompts,
         budgets="0", pairs=8, param=param, per_prompt_fidelity=True, targets=0, fidelity_per_kind=0,
         control_prompts=None, control_images_dir=None)


@app.command("import-nemo")
def import_nemo(
    path: Path = typer.Argument(..., help="the CSV of NeMo's reference code (3_detect_memorized_neurons.py)"),
    out: Path = typer.Option(..., help="folder to write the per-caption masks to"),
    model: str = typer.Option("tiny", help="the model the neurons were found on (its layers check the lists)"),
    neurons: str = typer.Option("refined", help="refined (the masks NeMo deploys) or initial"),
    layer_group: str = typer.Option("nemo-value", help="the layers the lists are for, in order (nemo-value: the "
                                                       "reference's; `dori ls` lists the groups)"),
):
    """Turn the neurons found by NeMo's reference code into dori masks, one per caption, so that the bypass
    benchmark attacks exactly those: `dori attack --masks NAME=OUT`."""
    if neurons not in ("refined", "initial"):  # before the imports and the model (the columns of REFERENCE_COLUMNS)
        raise DoriError(f"--neurons must be refined or initial, got {neurons!r}")
    import shlex

    from dori.mitigations.nemo import import_reference_masks

    masks = import_reference_masks(path, model, out, neurons, layer_group)
    empty = [m for m in masks.values() if not len(m)]
    say = Console(soft_wrap=True, highlight=False, markup=False).print  # a command to copy: never wrapped
    say(f"wrote {len(masks)} {neurons} NeMo masks to {out}, {sum(map(len, masks.values()))} neurons in all; "
        f"{len(empty)} empty ({sum(m.meta['skipped'] for m in empty)} of them prompts NeMo skipped as not memorized)")
    say(f"attack them: dori attack --model {shlex.quote(model)} --prompts PROMPTS --masks "
        f"{shlex.quote(f'nemo-ref={out}')}")


@app.command("ls")
def ls():
    """List registered models, metrics and prompt sets."""
    from dori.models.layers import LAYER_GROUPS
    from dori.registry import ALL

    for family, reg in ALL.items():
        table = Table(title=family, title_justify="left")
        table.add_column("name")
        table.add_column("description")
        for e in reg:
            table.add_row(e.name, e.description)
        _say(table)
    table = Table(title="layer groups", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, (_, desc) in LAYER_GROUPS.items():
        table.add_row(name, desc)
    _say(table)


@zoo.command("train-tiny")
def train_tiny_cmd(
    out: Path = typer.Option(..., help="output folder (a diffusers pipeline)"),
    steps: int = typer.Option(None, help="training steps (default: the shipped recipe's)"),
    duplicates: int = typer.Option(None, help="copies of each memorized photo in the training set"),
    latent_scale: float = typer.Option(1.0, help="latents = pixels in [-1, 1] times this (shipped: 1)"),
    prediction_type: str = typer.Option(None, help="epsilon (SD 1.x) or v_prediction (SD 2.x-768); "
                                        "default: the shipped recipe's"),
    procedural_layout: str = typer.Option(None, help="where procedural shapes are drawn: anywhere or "
                                          "centred; default: the shipped recipe's"),
    ema_decay: float = typer.Option(None, help="save a moving average of the weights with this decay "
                                    "per step (default: the last weights, as the shipped recipe)"),
    crop_extra_words: int = typer.Option(None, help="random frequent CLIP words added to each random photo "
                                         "crop's caption at every draw (default 0, as the shipped recipe)"),
    crop_template_captions: float = typer.Option(None, help="probability that a drawn random photo crop "
                                                 "takes another training caption with half its words "
                                                 "swapped (default: the shipped recipe's 1.0)"),
    n_procedural: int = typer.Option(None, help="procedural images (coloured shapes) in the training set "
                                     "(default: the shipped recipe's 5,000)"),
    seed: int = typer.Option(0),
    fused_optimizer: bool = typer.Option(False, help="PyTorch's fused AdamW: faster, but does not "
                                         "reproduce the shipped weights"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N (the same random draws; a GPU's float order, "
                               "so other weights, and not bit-reproducible)"),
):
    """Train the embedded tiny model from scratch with the shipped recipe (about 24 min on 2 cores)."""
    from dori.zoo.tiny_data import LAYOUTS
    from dori.zoo.train_tiny import TrainConfig, train_tiny

    cfg = TrainConfig(out=str(out), seed=seed, latent_scale=latent_scale, fused_optimizer=fused_optimizer,
                      ema_decay=ema_decay, device=device)
    if prediction_type is not None:
        cfg.prediction_type = prediction_type
    if steps is not None:
        cfg.steps = steps
    if procedural_layout is not None and procedural_layout not in LAYOUTS:
        raise typer.BadParameter(f"unknown layout {procedural_layout!r}; choose one of {', '.join(LAYOUTS)}")
    data = dict(duplicates=duplicates, crop_extra_words=crop_extra_words, n_procedural=n_procedural,
                crop_template_captions=crop_template_captions, procedural_layout=procedural_layout)
    for name, value in data.items():
        if value is not None:  # unset options keep the shipped recipe's data
            setattr(cfg.data, name, value)
    train_tiny(cfg)
    _say(f"saved {out}")


@zoo.command("build-tokenizer")
def build_tokenizer_cmd(
    bpe: Path = typer.Option(..., help="CLIP's bpe_simple_vocab_16e6.txt.gz (inside the open-clip-torch wheel)"),
    out: Path = typer.Option(..., help="tokenizer folder to write"),
):
    """Rebuild the real CLIP BPE tokenizer files shipped with the tiny model."""
    from dori.models.tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(bpe, out)
    _say(f"wrote {out}")


@zoo.command("calibrate-pixel")
def calibrate_pixel_cmd(
    model: str = typer.Option("tiny"),
    seeds: str = typer.Option("100,101,102,103", help="calibration seeds (not the demo's)"),
):
    """Measure the largest pixel-ssim score that occurs without replication (the threshold's basis)."""
    from dori.metrics.calibrate import calibrate_pixel_threshold

    res = calibrate_pixel_threshold(model, _ints(seeds))
    for name, score in res.pop("distractor_scores").items():
        _say(f"distractor score {score:.3f}  {name}", highlight=False)
    for k, v in res.items():
        _say(f"{k}: {v}")


QUIET_LOGGERS = ("httpx", "diffusers", "transformers")  # only their errors reach the terminal
QUIET_VERBOSITY = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # diffusers and transformers set their own level on first import, which comes after this (the commands
    # import them lazily): their verbosity variables make it ERROR too; a user's own setting is kept
    for var in QUIET_VERBOSITY:
        os.environ.setdefault(var, "error")
    from dori.analyses.distributed import close

    try:
        app()
    except DoriError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)  # "[attack]", "dori[x]"
        sys.exit(2)
    except PermissionError as e:  # a file or folder of someone else's met mid-run (e.g. inside a run folder)
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        what = f"{e.strerror or e}: {files}" if files else str(e)
        console.print(f"[bold red]error:[/] {escape(what)}; run as a user who can read and write it, or use "
                      "another folder (--out for a run's files, DORI_CACHE for dori's cache)", markup=True,
                      highlight=False)
        sys.exit(2)
    except SystemExit as e:  # how app() always ends (click's standalone mode), --help included
        # leave the process group on a clean exit only: after an error the launcher ends the other
        # processes, and leaving could wait for them
        if e.code in (0, None):
            close()
        raise


if __name__ == "__main__":
    main()
