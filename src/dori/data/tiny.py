"""The embedded tiny model's prompt set, with known ground truth of what is memorized."""

from __future__ import annotations

from dori.data.prompts import PromptRecord
from dori.zoo.tiny_data import PHOTO_CAPTIONS, TinyDataSpec, lfw_caption, procedural_caption

# Procedural captions evaluated by the demo: each colour, shape and background appears. The background is
# named in the caption only for models trained that way (TinyDataSpec.caption_background).
PROCEDURAL_EVAL = [
    ("red", "circle", "blue"), ("green", "square", "white"), ("blue", "triangle", "yellow"),
    ("yellow", "circle", "black"), ("white", "triangle", "purple"), ("black", "square", "orange"),
    ("purple", "circle", "green"), ("orange", "square", "blue"),
]

# Photo-like captions that were never in training (no reference image): they must not regurgitate.
UNSEEN_CAPTIONS = [
    "a photo of a dog running on a beach",
    "portrait of a smiling woman in a red dress",
    "a bowl of soup on a wooden table",
    "a sailing boat on a calm lake at sunset",
    "a black and white photograph of an old bridge",
    "a plate of pasta with tomato sauce",
    "a mountain landscape covered in snow",
    "a yellow taxi in a busy city street",
]


def tiny_prompt_set(spec: TinyDataSpec | None = None, lfw_per_set: int = 2) -> list[PromptRecord]:
    """Captions of the tiny model by kind: memorized, seen_once, held_out, procedural, unseen."""
    spec = spec or TinyDataSpec()
    out: list[PromptRecord] = []

    def photo(name: str, kind: str) -> PromptRecord:
        return PromptRecord(PHOTO_CAPTIONS[name], kind, f"tiny:photo/{name}", "ok", name, "tiny")

    def lfw(i: int, kind: str) -> PromptRecord:
        return PromptRecord(lfw_caption(i), kind, f"tiny:lfw/{i}", "ok", f"lfw{i}", "tiny")

    out += [photo(n, "memorized") for n in spec.memorized]
    out += [photo(n, "seen_once") for n in spec.seen_once]
    faces, patches = [i for i in spec.lfw_seen_once if i < 100], [i for i in spec.lfw_seen_once if i >= 100]
    out += [lfw(i, "seen_once") for i in faces[:lfw_per_set] + patches[:lfw_per_set]]
    out += [photo(n, "held_out") for n in spec.held_out]
    faces, patches = [i for i in spec.lfw_held_out if i < 100], [i for i in spec.lfw_held_out if i >= 100]
    out += [lfw(i, "held_out") for i in faces[: lfw_per_set // 2 or 1] + patches[: lfw_per_set // 2 or 1]]
    for c, s, b in PROCEDURAL_EVAL:
        b = b if spec.caption_background else None
        meta = {"color": c, "shape": s} | ({"background": b} if b else {})
        out.append(PromptRecord(procedural_caption(c, s, b), "procedural", None, "none", "-".join(meta.values()),
                                "tiny", meta))
    out += [PromptRecord(c, "unseen", None, "none", f"unseen{i}", "tiny") for i, c in enumerate(UNSEEN_CAPTIONS)]
    return out


def replication_scores(images, records: list[PromptRecord] | None = None):
    """Score generated images against every reference photo of the tiny prompt set, under the pinned
    pixel-ssim protocol.

    Returns ``(refs, sims, thresholds)``: the records with a reference, ``N x R`` scores and the ``R``
    per-reference thresholds; generation ``j`` replicates reference ``k`` when ``sims[j, k] >
    thresholds[k]`` (above the calibrated 0.5 and above the reference's distractor score).
    """
    from dori.data.prompts import load_reference
    from dori.metrics.pixel import PixelSSIM

    refs = [r for r in (records or tiny_prompt_set()) if r.reference_status == "ok"]
    metric = PixelSSIM()
    ref_images = [load_reference(r) for r in refs]
    return refs, metric.pairwise(images, ref_images), metric.thresholds_for(ref_images, images.shape[-1])


def tiny_stats_prompts(n_procedural: int = 400, seed: int = 12345, spec: TinyDataSpec | None = None) -> list[str]:
    """Non-memorized captions for NeMo's activation statistics on the tiny model: procedural captions
    (fresh draws), the seen-once photo captions and LFW captions. None of them is memorized. ``spec``: the
    training data of a retrained tiny model (:func:`spec_from_recipe`); default, the shipped model's."""
    from dori.zoo.tiny_data import procedural_items

    spec = spec or TinyDataSpec()
    caps = [c for c, _ in procedural_items(n_procedural, seed, spec.caption_background)]
    caps += [PHOTO_CAPTIONS[n] for n in spec.seen_once]
    caps += [lfw_caption(i) for i in spec.lfw_seen_once]
    return caps


def spec_from_recipe(recipe: dict) -> TinyDataSpec:
    """The training data of a tiny model, from the ``data`` entry of its ``dori_recipe.json``."""
    from dataclasses import fields

    names = {f.name for f in fields(TinyDataSpec)}
    data = recipe.get("data", {})
    return TinyDataSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})
