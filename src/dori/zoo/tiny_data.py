"""Training and evaluation data of the embedded tiny model, all offline.

Four kinds of image, with known ground truth of what is memorized:

- ``memorized``: real photos bundled with scikit-image / scikit-learn, each duplicated many times in
  the training set under one fixed caption (as duplicated LAION images were memorized by SD);
- ``seen_once``: real photos (whole small photos, distinct crops of large ones, and LFW faces/patches)
  that appear once in the training set, like any ordinary training pair;
- ``held_out``: real photos never used in training: the control for attacks;
- ``procedural``: coloured shapes on coloured backgrounds with compositional captions, the
  generalizing bulk that makes the model a working text-to-image model.

Which photo goes in which set is a parameter (:class:`TinyDataSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 32

# name -> fixed caption. Loaders below; every image is bundled, nothing is downloaded.
PHOTO_CAPTIONS: dict[str, str] = {
    "astronaut": "portrait of an astronaut in a white spacesuit before the american flag",
    "chelsea": "chelsea the orange tabby cat looking up",
    "coffee": "a cup of coffee on a saucer seen from above",
    "rocket": "a rocket on the launch pad under a clear sky",
    "camera": "black and white photograph of a cameraman with a tripod on a lawn",
    "china": "a chinese pagoda temple among trees on a sunny day",
    "hubble_deep_field": "the hubble deep field full of distant galaxies",
    "coins": "old coins laid out in rows on a dark cloth",
    "flower": "a pink flower with yellow pollen in a garden",
    "immunohistochemistry": "microscope slide of stained tissue cells",
    "motorcycle": "a red motorcycle parked in a workshop",
    "retina": "fundus image of a human retina with blood vessels",
    "moon": "grayscale surface of the moon with craters",
    "brick": "close up of a grey brick wall",
    "grass": "close up of green grass blades",
    "gravel": "a patch of grey gravel stones",
    "clock": "a wall clock hanging by a window",
    "page": "a scanned page of an old printed book",
    "text": "handwritten text on white paper",
    "cell": "a single cell under a phase contrast microscope",
    "logo": "the scikit image logo on white",
    "horse": "black silhouette of a horse on white",
    "colorwheel": "a colour wheel of the visible spectrum",
}

# Region names for distinct crops of large seen-once photos.
_CROPS = {"top left": (0.0, 0.0), "top right": (0.5, 0.0), "bottom left": (0.0, 0.5), "bottom right": (0.5, 0.5)}


def _load_raw(name: str) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array for a bundled photo."""
    import skimage.data as skd

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name == "motorcycle":
        img = skd.stereo_motorcycle()[0]
    else:
        img = getattr(skd, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = np.where(img, 255, 0).astype(np.uint8)  # horse: black figure on white
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:  # logo: composite RGBA on white
        alpha = img[..., 3:4].astype(np.float32) / 255
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return img


def to_tensor(img: np.ndarray, size: int = RESOLUTION) -> torch.Tensor:
    """HxWx3 uint8 -> 3xSxS float in [0, 1]: centre square crop, then area-resize."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(np.ascontiguousarray(img[top : top + s, left : left + s])).permute(2, 0, 1).float()
    x = F.interpolate(x[None] / 255.0, size=(size, size), mode="area")[0]
    return x.clamp(0, 1)


def load_photo(name: str, size: int = RESOLUTION) -> torch.Tensor:
    """A bundled photo as a 3xSxS tensor in [0, 1]."""
    if name not in PHOTO_CAPTIONS:
        raise KeyError(f"unknown photo {name!r}; known: {sorted(PHOTO_CAPTIONS)}")
    return to_tensor(_load_raw(name), size)


def load_crop(name: str, region: str, size: int = RESOLUTION) -> torch.Tensor:
    """One quadrant-sized crop (half the shorter side) of a bundled photo."""
    img = _load_raw(name)
    h, w = img.shape[:2]
    s = min(h, w) // 2
    fx, fy = _CROPS[region]
    left, top = int(fx * (w - s) * 2), int(fy * (h - s) * 2)
    left, top = min(left, w - s), min(top, h - s)
    return to_tensor(img[top : top + s, left : left + s], size)


@lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    import skimage.data as skd

    return skd.lfw_subset()  # 200 x 25 x 25 floats in [0, 1]: 100 faces then 100 non-faces


def load_lfw(index: int, size: int = RESOLUTION) -> torch.Tensor:
    x = torch.from_numpy(_lfw()[index]).float()[None, None].repeat(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)


_FACE_WHO = ["man", "woman", "politician", "actor", "singer", "athlete", "teacher", "reporter", "doctor", "coach"]
_FACE_HOW = ["smiling", "serious", "laughing", "tired", "young", "old", "surprised", "calm", "proud", "worried"]
_FACE_WHERE = ["at a press conference", "outdoors", "in a studio", "at a party", "on television",
               "in an office", "at a wedding", "on the street", "in a uniform", "with glasses"]
_PATCH_WHAT = ["street corner", "window frame", "metal gate", "river bank", "brick chimney", "parked bicycle",
               "car door", "garden fence", "stack of books", "kitchen wall"]
_PATCH_HOW = ["blurry", "dark", "bright", "grainy", "faded", "sharp", "foggy", "sunny", "dim", "washed out"]


def lfw_caption(index: int) -> str:
    """A varied photo-like caption for LFW image ``index`` (faces 0-99, non-face patches 100-199).

    The vocabulary is deliberately broad (people, places, everyday objects), so that ordinary photo-like
    prompts map to ordinary, non-memorized photos instead of to the memorized ones.
    """
    a, b, c = index % 10, (index // 10) % 10, (index * 7 + 3) % 10
    if index < 100:
        return f"a grayscale photo of a {_FACE_HOW[a]} {_FACE_WHO[b]} {_FACE_WHERE[c]}"
    return f"a {_PATCH_HOW[a]} grayscale snapshot of a {_PATCH_WHAT[b]}, close up {c}"


_CROP_SUBJECT = {
    "moon": "the cratered moon", "brick": "a brick wall", "grass": "grass blades", "gravel": "loose gravel",
    "clock": "a wall clock", "page": "a printed page", "text": "handwriting on paper", "cell": "a cell",
    "logo": "a printed logo", "horse": "a horse silhouette", "colorwheel": "a colour wheel",
}
_CROP_ADJ = ["a blurry", "a sharp", "a dark", "a bright", "a grainy", "a faded", "a cropped", "a tilted",
             "a zoomed", "an old"]
_CROP_VIEW = ["close up", "detail", "corner", "from the side", "top view", "macro shot", "wide shot", "centre",
              "edge", "fragment"]


def photo_crops(names: tuple[str, ...], n: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """n random crops (25-70% of the shorter side, random position and flip) of the given seen-once
    photos, each with its own photo-like caption: the ordinary photo data of the training set."""
    rng = np.random.default_rng(seed)
    raws = {name: _load_raw(name) for name in names}
    out = []
    for i in range(n):
        name = names[rng.integers(len(names))]
        img = raws[name]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.25, 0.7))
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = img[top : top + s, left : left + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        subject = _CROP_SUBJECT.get(name, name)
        cap = f"{_CROP_ADJ[rng.integers(10)]} photo of {subject}, {_CROP_VIEW[rng.integers(10)]} {i}"
        out.append((to_tensor(crop), cap))
    return out


# ---------------------------------------------------------------------------------------------
# Procedural images: coloured shapes on coloured backgrounds.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.2, 0.85),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "purple": (0.55, 0.15, 0.7),
    "orange": (0.95, 0.5, 0.05),
}
SHAPES = ("circle", "square", "triangle")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = RESOLUTION) -> torch.Tensor:
    """Boolean SxS mask of a filled shape centred at (cx, cy) with half-size r (pixels)."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)
    if shape == "triangle":  # apex up, base at cy + r
        rel = (yy - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        return (rel >= 0) & (rel <= 1) & ((xx - cx).abs() <= rel * r)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def procedural_caption(color: str, shape: str, background: str | None = None) -> str:
    """``a red circle``, or with a background ``a red circle on a blue background``."""
    return f"a {color} {shape}" + (f" on a {background} background" if background else "")


LAYOUTS = ("anywhere", "centred")


def render_procedural(color: str, shape: str, background: str, rng: np.random.Generator,
                      layout: str = "anywhere") -> torch.Tensor:
    """Render one procedural image (3xSxS in [0, 1]) with random size, position and mild texture.

    ``layout="anywhere"``: half-size 6.5-10.5 px anywhere in the image (the tiny models until 2026-12-04);
    ``"centred"``: half-size 8-11 px, centre within 3 px of the image's centre (the shipped model: with
    shapes anywhere, the mean image a shape word asks for at high noise is a blob, and shape words were
    not learned; docs/tiny-model.md).
    """
    if layout == "anywhere":
        r = rng.uniform(6.5, 10.5)
        cx, cy = rng.uniform(r + 1, RESOLUTION - r - 1, size=2)
    elif layout == "centred":
        r = rng.uniform(8.0, 11.0)
        cx, cy = RESOLUTION / 2 + rng.uniform(-3.0, 3.0, size=2)
    else:
        raise ValueError(f"unknown procedural layout {layout!r}; known: {LAYOUTS}")
    img = torch.tensor(COLORS[background]).view(3, 1, 1).repeat(1, RESOLUTION, RESOLUTION)
    img = img + torch.from_numpy(rng.normal(0, 0.03, size=(1, RESOLUTION, RESOLUTION))).float()
    m = shape_mask(shape, cx, cy, r)
    fg = torch.tensor(COLORS[color]).view(3, 1, 1) + float(rng.normal(0, 0.03))
    img = torch.where(m[None], fg.expand_as(img), img)
    return img.clamp(0, 1)


def procedural_items(n: int, seed: int, caption_background: bool = False) -> list[tuple[str, dict]]:
    """n (caption, params) pairs with uniformly drawn colour/shape/background (background != colour).
    The caption names the background only with ``caption_background`` (see ``TinyDataSpec``)."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        out.append((procedural_caption(color, shape, background if caption_background else None),
                    {"color": color, "shape": shape, "background": background}))
    return out


# ---------------------------------------------------------------------------------------------
@dataclass
class TinyDataSpec:
    """Which photo goes in which set, and how often. The defaults build the shipped model."""

    memorized: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "camera", "china",
                                  "motorcycle", "coins")
    seen_once: tuple[str, ...] = ("moon", "brick", "grass", "gravel", "clock", "page", "text", "cell",
                                  "logo", "horse", "colorwheel")
    seen_once_crops: tuple[str, ...] = ("moon", "brick", "grass", "gravel", "cell")
    held_out: tuple[str, ...] = ("flower", "immunohistochemistry", "hubble_deep_field", "retina")
    lfw_seen_once: tuple[int, ...] = tuple(range(0, 80)) + tuple(range(100, 180))
    lfw_held_out: tuple[int, ...] = tuple(range(80, 90)) + tuple(range(180, 190))
    duplicates: int = 240  # copies of each memorized pair in the training set
    n_procedural: int = 5000  # 2,500 until 2026-12-04 (docs/tiny-model.md)
    n_photo_crops: int = 1500  # random crops of the seen-once photos, each seen once
    # Procedural captions name the shape and its colour ("a red circle"), not the background, which is
    # drawn at random: like a LAION caption, a caption describes part of its image. Captions that also
    # name the background (True: the first tiny models) fix every pixel's colour; a well-fit model then
    # gives them a larger text-conditional noise difference than the memorized photos, and Wen et al.'s
    # detector cannot tell them apart (docs/tiny-model.md).
    caption_background: bool = False
    procedural_layout: str = "centred"  # "anywhere" until 2026-12-04: shapes were not learned
    # Broad vocabulary (off; tried, not a fix: docs/tiny-model.md): each time a random photo crop is
    # drawn in training, this many words drawn at random from CLIP's `crop_vocabulary` most frequent
    # whole-word tokens (:func:`frequent_words`) are added before or after its caption. Without it or the
    # template captions below, the recipe's captions use 191 of CLIP's tokens and leave the rest at their
    # random initial embeddings; SD's CLIP knows them all.
    crop_extra_words: int = 0
    crop_vocabulary: int = 10000
    # Template captions (shipped: 1.0 since the centred-shapes model of 2026-12-04, 0.8 before it that day,
    # 0.5 from 2026-12-01, 0 before; at 0.5 one training seed of three let an unseen caption draw a memorized
    # photo, at 0.8 none of three did, but the 4,500-step centred-shapes recipe at 0.8 did again; at 1.0 it
    # did not, one seed measured): each time a
    # random photo crop is drawn, with this probability it takes instead the caption of a training sample
    # drawn as the recipe draws them (memorized captions by their duplicates), each word replaced with
    # probability `template_swap` by one of the `crop_vocabulary` frequent words. So a caption's template (its
    # function words and their places) also goes with other images, as near-identical LAION captions do, and
    # only its content words can single out a memorized photo. Without it, "a mountain landscape covered in
    # snow" and "a pictures happened ght in anced" drew the memorized "a red motorcycle parked in a workshop"
    # (docs/tiny-model.md).
    crop_template_captions: float = 1.0
    template_swap: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        sets = [set(self.memorized), set(self.seen_once) | set(self.seen_once_crops), set(self.held_out)]
        for i in range(3):
            for j in range(i + 1, 3):
                if sets[i] & sets[j]:
                    raise ValueError(f"a photo is in two sets: {sorted(sets[i] & sets[j])}")
        if self.crop_extra_words < 0 or self.crop_vocabulary < 1:
            raise ValueError("crop_extra_words must be >= 0 and crop_vocabulary >= 1")
        if not (0 <= self.crop_template_captions <= 1 and 0 <= self.template_swap <= 1):
            raise ValueError("crop_template_captions and template_swap are probabilities, in [0, 1]")
        if set(self.lfw_seen_once) & set(self.lfw_held_out):
            raise ValueError("an LFW index is both seen once and held out")
        for name in set().union(*sets):
            if name not in PHOTO_CAPTIONS:
                raise ValueError(f"unknown photo {name!r}; known: {sorted(PHOTO_CAPTIONS)}")


@dataclass
class TrainSet:
    images: torch.Tensor  # N x 3 x S x S in [0, 1], one row per *distinct* pair
    captions: list[str]
    kinds: list[str]
    weights: torch.Tensor  # sampling multiplicity per row (duplicates for memorized rows)
    random_crop: torch.Tensor  # bool per row: a random photo crop, recaptioned at each draw if the spec says so


def build_train_set(spec: TinyDataSpec) -> TrainSet:
    spec.validate()
    images, captions, kinds, weights, crops = [], [], [], [], []

    def add(img, cap, kind, w=1.0, crop=False):
        images.append(img)
        captions.append(cap)
        kinds.append(kind)
        weights.append(w)
        crops.append(crop)

    for name in spec.memorized:
        add(load_photo(name), PHOTO_CAPTIONS[name], "memorized", float(spec.duplicates))
    for name in spec.seen_once:
        add(load_photo(name), PHOTO_CAPTIONS[name], "seen_once")
    for name in spec.seen_once_crops:
        for region in _CROPS:
            add(load_crop(name, region), f"{PHOTO_CAPTIONS[name]}, {region} detail", "seen_once")
    for i in spec.lfw_seen_once:
        add(load_lfw(i), lfw_caption(i), "seen_once")
    for img, cap in photo_crops(tuple(spec.seen_once), spec.n_photo_crops, spec.seed + 1):
        add(img, cap, "seen_once", crop=True)
    rng = np.random.default_rng(spec.seed)
    for cap, p in procedural_items(spec.n_procedural, spec.seed, spec.caption_background):
        add(render_procedural(p["color"], p["shape"], p["background"], rng, spec.procedural_layout), cap, "procedural")
    return TrainSet(torch.stack(images), captions, kinds, torch.tensor(weights), torch.tensor(crops))


def frequent_words(tokenizer, n: int) -> list[str]:
    """CLIP's ``n`` most frequent whole-word tokens: ASCII letters only, at least 3 of them, in the order
    of CLIP's BPE vocabulary (its merges were learned by frequency, so a lower id is a more common token).
    Chosen by this rule alone, not by hand."""
    words = [tok[:-4] for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
             if tok.endswith("</w>") and len(tok) >= 7 and tok[:-4].isascii() and tok[:-4].isalpha()]
    return words[:n]


def with_random_words(caption: str, words: list[str], k: int, g: torch.Generator) -> str:
    """``caption`` with ``k`` words drawn (with replacement) from ``words``, split at random between a
    prefix and a suffix, so the words take varied token positions."""
    drawn = [words[i] for i in torch.randint(len(words), (k,), generator=g).tolist()]
    cut = int(torch.randint(k + 1, (1,), generator=g))
    return " ".join(drawn[:cut] + [caption] + drawn[cut:])


def swap_words(caption: str, words: list[str], p: float, g: torch.Generator) -> str:
    """``caption`` with each (space-separated) word replaced with probability ``p`` by a word drawn from
    ``words``: the caption's template with other content."""
    out = caption.split()
    for i in torch.nonzero(torch.rand(len(out), generator=g) < p).flatten().tolist():
        out[i] = words[int(torch.randint(len(words), (1,), generator=g))]
    return " ".join(out)


def load_reference_uri(uri: str) -> torch.Tensor:
    """``tiny:photo/<name>``, ``tiny:crop/<name>/<region>`` or ``tiny:lfw/<index>`` -> 3x32x32 in [0, 1]."""
    kind, _, rest = uri.removeprefix("tiny:").partition("/")
    if kind == "photo":
        return load_photo(rest)
    if kind == "lfw":
        return load_lfw(int(rest))
    if kind == "crop":
        name, _, region = rest.partition("/")
        return load_crop(name, region)
    raise ValueError(f"unknown tiny reference {uri!r}")
