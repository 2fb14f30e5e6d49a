import pytest
import torch

from dori.errors import DoriError
from dori.metrics.calibrate import photo_pair_null
from dori.metrics.pixel import PIXEL_SSIM_THRESHOLD, PixelSSIM, resize_square
from dori.metrics.replication import memorization_rate, summarize
from dori.metrics.sscd import SSCD
from dori.zoo.tiny_data import load_lfw, load_photo


def test_pixel_ssim_is_one_on_identical_images_and_low_on_different_photos():
    m = PixelSSIM()
    a, b = load_photo("astronaut"), load_photo("coffee")
    s = m.pairwise(torch.stack([a, b]), [a, b])
    assert s[0, 0] == pytest.approx(1.0) and s[1, 1] == pytest.approx(1.0)
    assert s[0, 1] < PIXEL_SSIM_THRESHOLD


def test_pixel_ssim_resizes_references_to_generation_resolution():
    big = torch.rand(3, 96, 128)
    assert resize_square(big, 32).shape == (3, 32, 32)
    gen = resize_square(big, 32)[None]
    assert PixelSSIM().score(gen, big)[0] == pytest.approx(1.0, abs=1e-6)


def test_a_distinct_photo_above_the_global_threshold_is_not_a_copy():
    """pixel-ssim's distractor rule: a score counts only above what other real photos reach."""
    m = PixelSSIM()
    face = load_lfw(80)  # the held-out "smiling doctor": a smooth grayscale face
    others = torch.stack([load_lfw(i) for i in range(100) if i != 80])  # the other LFW faces
    s = m.score(others, face)
    look_alike = others[int(s.argmax())]
    assert PIXEL_SSIM_THRESHOLD < float(s.max()) < 0.98  # a different face scores above the global threshold
    assert m.threshold_for(face) >= float(s.max())  # ... and sets this reference's threshold
    assert not m.replicated(m.score(look_alike[None], face), face).any()
    assert m.replicated(m.score(look_alike[None], face)).all()  # the global threshold alone calls it a copy
    assert m.replicated(m.score(face[None], face), face).all()  # the reference itself still replicates
    assert PixelSSIM(distractors=False).threshold_for(face) == PIXEL_SSIM_THRESHOLD
    # the memorized photos' distractor scores lie below the global threshold: their rule is unchanged
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "china", "motorcycle", "coins"):
        assert m.threshold_for(load_photo(name)) == PIXEL_SSIM_THRESHOLD


def test_distractor_scores_are_read_back_from_the_cache_and_keyed_by_what_they_depend_on(monkeypatch, tmp_path):
    import json

    import dori.metrics.pixel as pixel

    monkeypatch.setenv("DORI_CACHE", str(tmp_path))
    monkeypatch.setattr(pixel, "_DISTRACTOR_SCORES", {})  # a fresh process
    face = load_lfw(3, 32)
    first = PixelSSIM().distractor_score(face)
    stored = json.loads((tmp_path / "pixel_ssim_distractors.json").read_text())
    assert list(stored.values()) == [first]

    computed = []
    real = PixelSSIM.pairwise
    monkeypatch.setattr(PixelSSIM, "pairwise", lambda self, *a: computed.append(1) or real(self, *a))
    monkeypatch.setattr(pixel, "_DISTRACTOR_SCORES", {})  # the next process reads the file: nothing computed
    assert PixelSSIM().distractor_score(face) == first and computed == []
    PixelSSIM().distractor_score(load_lfw(4, 32))  # another reference
    PixelSSIM().distractor_score(face, size=16)  # another size (another pool)
    assert len(computed) == 2 and len(json.loads((tmp_path / "pixel_ssim_distractors.json").read_text())) == 3
    monkeypatch.setattr(pixel, "SAME_IMAGE_SSIM", 0.99)  # another protocol constant
    PixelSSIM().distractor_score(face)
    assert len(computed) == 3

    monkeypatch.setattr(pixel, "SAME_IMAGE_SSIM", 0.98)
    key = next(k for k, v in stored.items() if v == first)
    for bad in ('{"a": "not a number"', json.dumps({key: float("inf")}), json.dumps({key: 7.0})):
        (tmp_path / "pixel_ssim_distractors.json").write_text(bad)  # unreadable, or not a score: computed again
        monkeypatch.setattr(pixel, "_DISTRACTOR_SCORES", {})
        before = len(computed)
        assert PixelSSIM().distractor_score(face) == first and len(computed) == before + 1


def test_threshold_lies_above_the_photo_pair_null():
    null = photo_pair_null()
    assert null.numel() > 500
    assert null.max() < PIXEL_SSIM_THRESHOLD


class _TinyDescriptor(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)) + x.std(dim=(2, 3))


@pytest.fixture
def sscd_file(tmp_path):
    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.script(_TinyDescriptor()).save(str(path))
    return path


@pytest.mark.parametrize("protocol,size", [("nemo", (320, 320)), ("wen", (224, 224))])
def test_sscd_protocol_preprocessing_and_cosine(sscd_file, protocol, size):
    m = SSCD(sscd_file, protocol=protocol)
    x = torch.rand(2, 3, 48, 64)
    pre = m.preprocess(x)
    assert pre.shape[-2:] == size
    if protocol == "wen":  # mean = std = 0.5 maps [0, 1] to [-1, 1]
        assert pre.min() >= -1 - 1e-4 and pre.max() <= 1 + 1e-4
    s = m.pairwise(x, [x[0], x[1]])
    assert s.diagonal().allclose(torch.ones(2), atol=1e-5)
    assert m.threshold == 0.7 and m.name == f"sscd-{protocol}"


def test_sscd_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(DoriError, match="SSCD model file not found.*does not download"):
        SSCD(tmp_path / "sscd_disc_mixup.torchscript.pt")


def test_sscd_rejects_non_torchscript(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(DoriError, match="not a TorchScript"):
        SSCD(bad)


def test_memorization_rate_aggregations():
    rows = [{"caption": "a", "replicated": True, "score": 0.9}, {"caption": "a", "replicated": False, "score": 0.2},
            {"caption": "b", "replicated": False, "score": 0.1}, {"caption": "b", "replicated": False, "score": 0.1}]
    assert memorization_rate(rows, "mean") == pytest.approx(0.25)
    assert memorization_rate(rows, "any") == pytest.approx(0.5)
    s = summarize(rows)
    assert s["n_images"] == 2 and s["score_median"] == pytest.approx(0.15)
    with pytest.raises(ValueError):
        memorization_rate(rows, "max")


def test_bypass_aggregates_keep_budgets_apart():
    from dori.analyses.demo import aggregate

    def row(stage, setting, budget, replicated):
        return {"stage": stage, "setting": setting, "budget": budget, "kind": "memorized", "caption": "a",
                "seed": 0, "replicated": replicated, "score": 0.9 if replicated else 0.1}

    agg = aggregate([row("mitigate", "nemo", 0, False), row("bypass", "nemo+dori", 0, False),
                     row("bypass", "nemo+dori", 50, True), row("bypass", "nemo+random", 50, False)])
    assert {k: v["mr"] for k, v in agg.items()} == {
        "mitigate/nemo/memorized": 0.0, "bypass/nemo+dori@0/memorized": 0.0,
        "bypass/nemo+dori@50/memorized": 1.0, "bypass/nemo+random@50/memorized": 0.0}


def test_the_reports_bypass_rows_put_the_control_last_and_name_what_they_hold():
    from dori.analyses.bypass import bypass_table
    from dori.reports.html import _bypass_section

    def row(setting, budget, caption, kind):
        return {"stage": "bypass", "setting": setting, "budget": budget, "caption": caption, "kind": kind,
                "seed": 0, "image": f"{setting}-{budget}.png", "reference": "ref.png", "replicated": False,
                "score": 0.1, "threshold": 0.5}

    b = {"budgets": [0, 50], "attack": "DoRI", "table": []}
    control = [row(f"none+{a}", n, "a clock", "held_out") for a, n in (("dori", 0), ("dori", 50), ("random", 50))]
    wanda = [row(f"wanda+{a}", n, "a cat", "memorized") for a, n in (("dori", 0), ("dori", 50), ("random", 50))]
    page = _bypass_section(b, control + wanda, None)
    assert page.index("<h3>wanda:") < page.index("<h3>the non-memorized control, unmitigated:")
    b = bypass_table(control + wanda, [0, 50]) | {"attack": "DoRI"}  # with its per-image rows
    page = _bypass_section(b, control + wanda, None)
    assert page.index("Per image, memorized targets") < page.index("Per image, non-memorized control")
    assert "<td class='caption'>a cat</td><td>memorized</td><td class='num'>0/1 (0.10)</td>" in page
    as_is = [row(f"none+{a}", n, "a cat", "memorized") for a, n in (("dori", 0), ("dori", 50), ("random", 50))]
    page = _bypass_section(b, control + as_is, None)  # --mitigation none: the model as it is
    assert "<h3>the model as it is: memorized targets and the non-memorized control:" in page


def test_procedural_check_reads_colour_shape_and_an_optional_background():
    import numpy as np

    from dori.metrics.procedural import check_procedural
    from dori.zoo.tiny_data import render_procedural

    img = render_procedural("red", "square", "blue", np.random.default_rng(0))
    named = check_procedural(img, "red", "square", "blue")
    assert named["ok"] and named["background_ok"]
    unnamed = check_procedural(img, "red", "square")
    assert unnamed["ok"] and unnamed["background_ok"] is None
    assert not check_procedural(img, "red", "square", "green")["ok"]
    assert not check_procedural(img, "green", "square")["ok"]


def test_caption_blind_shape_score():
    from dori.metrics.procedural import caption_blind_shape_score

    # half the captions name a circle, every generation draws one: blind to the word, half are right
    assert caption_blind_shape_score(["circle"] * 4, ["circle", "circle", "square", "triangle"]) == 0.5
    # each shape drawn in a quarter of the generations (one has no foreground): 1/4 x (1/4 + 1/4 + 2/4)
    assert abs(caption_blind_shape_score(["circle", "square", "triangle", None],
                                         ["square", "triangle", "circle", "circle"]) - 0.25) < 1e-12


def test_procedural_check_reads_blurred_shapes():
    """Generations have soft edges: the check must still read the shape of a blurred rendering."""
    import numpy as np
    import torch.nn.functional as F

    from dori.metrics.procedural import check_procedural
    from dori.zoo.tiny_data import procedural_items, render_procedural

    k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / (2 * 1.5**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2  # a 7 x 7 Gaussian of sigma 1.5 px
    rng, right = np.random.default_rng(0), 0
    items = procedural_items(60, 0)
    for _, p in items:
        img = render_procedural(p["color"], p["shape"], p["background"], rng)
        img = F.conv2d(F.pad(img[None], (3, 3, 3, 3), mode="replicate"), k.repeat(3, 1, 1, 1), groups=3)[0]
        right += check_procedural(img, p["color"], p["shape"])["shape_ok"]
    assert right >= 0.9 * len(items), f"{right} of {len(items)} blurred shapes read right"


def test_procedural_layouts_place_the_shape_where_they_say():
    import numpy as np

    from dori.metrics.procedural import check_procedural
    from dori.zoo.tiny_data import LAYOUTS, render_procedural

    rng = np.random.default_rng(0)
    for layout in LAYOUTS:
        for shape in ("circle", "square", "triangle"):
            img = render_procedural("yellow", shape, "blue", rng, layout)
            assert check_procedural(img, "yellow", shape)["ok"], (layout, shape)
    for _ in range(20):  # centred: the shape's bounding box centre within 3 px of the image centre
        img = render_procedural("yellow", "square", "blue", rng, "centred")
        ys, xs = torch.nonzero((img - img[:, :1, :1]).abs().sum(0) > 0.5, as_tuple=True)
        assert abs((ys.min() + ys.max()) / 2 - 15.5) <= 3.5 and abs((xs.min() + xs.max()) / 2 - 15.5) <= 3.5
    with pytest.raises(ValueError, match="unknown procedural layout"):
        render_procedural("yellow", "square", "blue", rng, "diagonal")
