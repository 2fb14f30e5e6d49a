"""`dori finetune`: adversarial fine-tuning of a model's UNet against DoRI, written as a fine-tuned UNet
folder that the bypass benchmark audits with ``dori attack --finetuned NAME=OUT/unet``.

Layout of ``out``: ``masks/<surrogate>/`` (the pruning masks that draw the surrogates), ``surrogates/``
(one PNG per memorized caption: what its memorized image is steered to), ``checkpoints/`` (the last
finished epoch, removed at the end), ``unet/`` (the fine-tuned UNet, diffusers' format, safetensors) and
``finetune.json`` (manifest, settings, one record per epoch). A killed run started again with the same
arguments resumes after its last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from dori.errors import DoriError

log = logging.getLogger(__name__)

SURROGATE_SEEDS = 8  # sampling seeds tried per memorized caption for a surrogate that does not replicate


def pick_surrogate(pipe, mask, rec, metric, seed: int, png: Path, key: dict | None = None) -> dict:
    """The surrogate of ``rec``'s memorized image: the first of the pruned model's generations from its prompt
    (sampling seeds ``seed``, ``seed + 1``, ...) that does not replicate the image (the algorithm wants the
    same meaning in other pixels: steering to a copy would keep the copy), written to ``png``; if every
    seed replicates, the one that scores lowest, with a warning. Returns its seed, score and verdict, as
    scored on the PNG read back. One found before under the same ``key`` (JSON values: the model, mask, metric)
    is reused."""
    from dori.data.prompts import load_image, load_reference
    from dori.mitigations.masks import apply_mask
    from dori.models.generate import generate
    from dori.reports.images import save_png
    from dori.reports.results import write_json

    info = png.with_suffix(".json")
    seeds = list(range(seed, seed + SURROGATE_SEEDS))
    key = json.loads(json.dumps({**(key or {}), "seeds": seeds, "mask": mask.digest(), "metric": repr(metric)}))
    if png.is_file() and info.is_file():
        found = json.loads(info.read_text())
        if found.pop("key", None) == key:
            return found
    ref = load_reference(rec).float()
    with apply_mask(pipe, mask):
        images = generate(pipe, [rec.caption], seeds=seeds).images.float().cpu()
    scores = metric.score(images, ref)
    copies = metric.replicated(scores, ref)
    i = int((~copies).nonzero()[0]) if not bool(copies.all()) else int(scores.argmin())
    save_png(images[i], png)
    score = metric.score(load_image(png).float()[None], ref)
    out = {"caption": rec.caption, "seed": seeds[i], "score": float(score[0]),
           "replicates": bool(metric.replicated(score, ref)[0]), "copies_among_seeds": int(copies.sum())}
    if out["replicates"]:
        log.warning("every one of %d generations of the pruned model from %r replicates its memorized image: the "
                    "surrogate (seed %d, score %.2f) is a copy, and the fine-tuning will keep it; use another "
                    "--surrogate", len(seeds), rec.caption[:60], out["seed"], out["score"])
    write_json(info, {**out, "key": key})  # written last: marks the surrogate complete
    return out


def keep_records(model: str, keep_prompts: str | None, keep_images_dir: str | None) -> list:
    """The records of ``keep_prompts`` (non-memorized, with their image on disk), read and checked before the
    model loads; [] for the tiny recipe's own pairs, which need no file (:func:`keep_pairs`)."""
    from dori.data.prompts import load_prompt_set

    if keep_images_dir and not keep_prompts:
        raise DoriError("--keep-images-dir is the folder of --keep-prompts' images: give both")
    if keep_prompts:
        recs = [r for r in load_prompt_set(keep_prompts, keep_images_dir, default_kind="N")
                if not r.memorized and r.reference_status == "ok"]
        if not recs:
            raise DoriError(f"--keep-prompts {keep_prompts}: no non-memorized caption with its image on disk (check "
                            "--keep-images-dir)")
        return recs
    if model != "tiny" and not (Path(model).expanduser() / "dori_recipe.json").is_file():
        raise DoriError("adversarial fine-tuning keeps the model's utility with ordinary image-caption pairs: give "
                        "--keep-prompts FILE --keep-images-dir DIR (e.g. NeMo's unmemorized LAION prompts and images)")
    return []


def keep_pairs(pipe, records: list) -> tuple[torch.Tensor, list[str]]:
    """The ordinary image-caption pairs of L_DM: ``records`` (:func:`keep_records`) at the model's
    resolution, or, for a tiny model of dori's recipe, its own training pairs that are not memorized."""
    from dori.analyses.bypass import target_images
    from dori.data.prompts import load_reference

    if records:
        return target_images(pipe, [load_reference(r) for r in records]), [r.caption for r in records]
    from dori.data.tiny import spec_from_recipe
    from dori.zoo.tiny_data import build_train_set

    data = build_train_set(spec_from_recipe(pipe.dori_recipe))
    rows = [i for i, k in enumerate(data.kinds) if k != "memorized"]
    return data.images[rows], [data.captions[i] for i in rows]


def run_finetune(out: str | Path, model: str = "tiny", prompt_set: str = "tiny", images_dir: str | None = None,
                 surrogate: str = "wanda", max_targets: int | None = None, keep_prompts: str | None = None,
                 keep_images_dir: str | None = None, epochs: int = 5, steps: int = 50, lr: float = 1e-4,
                 batch: int = 8, attack: dict | None = None, method_params: dict | None = None,
                 stats_prompts: str | None = None, metric: str | None = None, sscd_path: str | None = None,
                 seed: int = 0, device: str = "cpu", command: str = "dori finetune") -> dict:
    """Adversarially fine-tune ``model``'s UNet against DoRI on the memorized captions of ``prompt_set`` (the
    first ``max_targets``; None: all); write ``out`` (module docstring) and return ``finetune.json``'s dict.

    ``surrogate``: the pruning (wanda or nemo, with ``method_params``) whose generation from each memorized
    prompt is the image that prompt and its triggers are steered to (:func:`pick_surrogate`; ``metric``
    and ``sscd_path`` as for ``dori attack`` judge that it is no copy). ``attack``:
    DoRI's parameters (default: the model's). ``keep_prompts``: see :func:`keep_pairs`.
    """
    from dori.analyses.demo import check_method_params, check_metric, make_attack, make_method, make_metric
    from dori.analyses.mitigate import attack_targets, localize_masks, require_unique_captions
    from dori.analyses.runfile import absolute_path
    from dori.data.prompts import load_image, load_prompt_set, load_reference
    from dori.mitigations.adversarial_finetuning import AdversarialFineTuning
    from dori.models.loading import check_device, load_pipeline, model_id
    from dori.registry import MODELS, PROMPT_SETS
    from dori.reports.images import slug
    from dori.reports.results import make_out_dir, manifest, tensor_digest, write_json

    t0 = time.time()
    out = Path(out)
    model, prompt_set = absolute_path(model, MODELS), absolute_path(prompt_set, PROMPT_SETS)
    images_dir, keep_prompts, keep_images_dir = (p and str(absolute_path(p))
                                                 for p in (images_dir, keep_prompts, keep_images_dir))
    config = dict(model=str(model), prompt_set=str(prompt_set), images_dir=images_dir, surrogate=surrogate,
                  max_targets=max_targets, keep_prompts=keep_prompts, keep_images_dir=keep_images_dir,
                  epochs=epochs, steps=steps, lr=lr, batch=batch, attack=attack, method_params=method_params,
                  stats_prompts=stats_prompts, metric=metric, sscd_path=sscd_path and str(absolute_path(sscd_path)),
                  seed=seed, device=device)
    man = manifest(command, config, [seed])
    loop = AdversarialFineTuning(epochs=epochs, steps=steps, lr=lr, batch=batch)  # bad values fail here
    if surrogate not in ("wanda", "nemo"):
        raise DoriError(f"--surrogate takes wanda or nemo (the pruning that draws the surrogate images), got "
                        f"{surrogate!r}")
    check_method_params(method_params or {}, [surrogate])
    if max_targets is not None and max_targets < 1:
        raise DoriError(f"max_targets must be 1 or more (None: all), got {max_targets}")
    records = load_prompt_set(prompt_set, images_dir)
    targets = attack_targets(records, max_targets)
    if not targets:
        raise DoriError(f"the prompt set {prompt_set} has no memorized prompt with its reference image on disk: "
                        "nothing to fine-tune against (check --images-dir)")
    require_unique_captions(targets)
    keep = keep_records(str(model), keep_prompts, keep_images_dir)
    check_device(device)
    check_metric(metric, str(model), sscd_path)
    done = out / "finetune.json"
    if done.is_file():  # a finished run: the same settings are done, other ones would replace it
        old = json.loads(done.read_text())
        same = {k: v for k, v in json.loads(json.dumps(config)).items() if k != "device"}
        if {k: v for k, v in old.get("manifest", {}).get("config", {}).items() if k != "device"} == same \
                and (out / "unet").is_dir():
            log.info("%s holds this fine-tune already (finetune.json): nothing to do", out)
            return old
        raise DoriError(f"{out} holds a fine-tune made with other settings (finetune.json): give another --out")
    if (out / "unet").exists() and not (out / "checkpoints").is_dir():
        raise DoriError(f"{out / 'unet'} exists and was not written by dori finetune: give another --out")
    make_out_dir(out)

    pipe = load_pipeline(model, device=device)
    dori = make_attack(pipe, attack)
    method = make_method(surrogate, pipe, stats_prompts, (method_params or {}).get(surrogate))
    masks = localize_masks(pipe, method, targets, out)  # saved under out/masks/<surrogate>, reused on resume
    metric = make_metric(metric, pipe, sscd_path)
    picked, surrogates = [], []
    for rec in targets:  # read back from the PNG, so that a resumed run steers to the same 8-bit image
        png = out / "surrogates" / f"{slug(rec.caption)}.png"
        picked.append(pick_surrogate(pipe, masks[rec.caption], rec, metric, seed, png, {"model": model_id(pipe)}))
        surrogates.append(load_image(png).float())
    from dori.analyses.bypass import target_images

    images = target_images(pipe, [load_reference(r) for r in targets])
    keep_x, keep_c = keep_pairs(pipe, keep)
    surrogates = torch.stack(surrogates)
    # what the checkpoints must have been made with to be resumed: the settings and every input's content
    key = {"config": {k: v for k, v in config.items() if k != "device"}, "model": model_id(pipe),
           "attack": dori.params(), "targets": [tensor_digest(images)], "surrogates": tensor_digest(surrogates),
           "keep": [tensor_digest(keep_x), hashlib.sha1("\n".join(keep_c).encode()).hexdigest()[:16]]}
    epochs_run = loop.run(pipe, images, [r.caption for r in targets], surrogates, keep_x, keep_c, dori, seed=seed,
                          checkpoints=out / "checkpoints", key=key)
    tmp = out / "unet.tmp"  # pipe.unet holds the fine-tuned weights now (the pipeline is this run's own)
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.unet.save_pretrained(tmp)  # safetensors
    shutil.rmtree(out / "unet", ignore_errors=True)
    tmp.rename(out / "unet")
    man["seconds"] = round(time.time() - t0, 1)
    man["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = {"manifest": man, "fine_tuning": loop.params(), "attack": repr(dori), "surrogate": repr(method),
              "metric": repr(metric), "surrogates": picked,
              "targets": [r.caption for r in targets], "keep_pairs": len(keep_c), "epochs": epochs_run,
              "unet": str(out / "unet")}
    write_json(out / "finetune.json", result)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the weights are in unet/ now
    return result
