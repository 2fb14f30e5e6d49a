"""Any mask under the bypass benchmark: masks saved earlier (a folder per caption, or one file), attacked
like NeMo's and Wanda's (dori.mitigations.masks.SavedMasks; `dori attack --masks NAME=PATH`)."""

import json
import re

import pytest

from dori.analyses.mitigate import attack_targets
from dori.data.prompts import load_prompt_set
from dori.errors import DoriError
from dori.mitigations.masks import Mask, SavedMasks
from dori.models.layers import resolve_layers


def _save_masks(pipe, folder, captions):
    v = resolve_layers(pipe.unet, "nemo-value")[0].name
    made = {c: Mask("neuron", {v: [i, i + 5]}, {"prompt": c, "method": "hand"}) for i, c in enumerate(captions)}
    for i, m in enumerate(made.values()):
        m.save(folder / f"m{i}")
    return made


def test_saved_masks_give_each_caption_its_own_mask_or_one_mask_for_all(tiny_pipe, tmp_path):
    caps = [r.caption for r in attack_targets(load_prompt_set("tiny"), 3)]
    made = _save_masks(tiny_pipe, tmp_path / "f", caps[:2])
    joint = made[caps[0]].union(made[caps[1]])
    joint.save(tmp_path / "f" / "_joint")  # no prompt: skipped when matching captions

    per = SavedMasks("mine", tmp_path / "f")
    for c in caps[:2]:
        got = per.localize(tiny_pipe, c)
        assert got.digest() == made[c].digest() and got.meta["source_meta"]["method"] == "hand"
        assert got.meta["prompt"] == c and got.meta["method"] == "mine"
    with pytest.raises(DoriError, match=re.escape("has no mask for 1 caption(s), e.g. " + repr(caps[2][:60]))):
        per.require(caps)
    one = SavedMasks("deployed", tmp_path / "f" / "_joint.json")
    assert {one.localize(tiny_pipe, c).digest() for c in caps} == {joint.digest()}
    one.require(caps)  # one mask stands for every caption

    before = per.params()
    assert before == SavedMasks("mine", tmp_path / "f").params()
    Mask("neuron", {next(iter(made[caps[0]].layers)): [7]}, {"prompt": caps[0]}).save(tmp_path / "f" / "m0")
    assert per.params()["digest"] != before["digest"]  # changed masks are not mistaken for the saved copies


@pytest.mark.parametrize("name, path, message", [
    ("wanda", "f", "not one of none, nemo, wanda"),
    ("my mask", "f", "use letters, digits"),
    ("mine", "nowhere", "is neither a folder of masks nor a mask file"),
    ("mine", "empty", "holds no mask whose metadata names its prompt"),
    ("mine", "twice", "are both for the prompt"),
    ("mine", "other", "is not a linear layer of this UNet"),
])
def test_bad_saved_masks_are_one_clear_error(tiny_pipe, tmp_path, name, path, message):
    cap = attack_targets(load_prompt_set("tiny"), 1)[0].caption
    _save_masks(tiny_pipe, tmp_path / "f", [cap])
    (tmp_path / "empty").mkdir()
    _save_masks(tiny_pipe, tmp_path / "twice", [cap])[cap].save(tmp_path / "twice" / "m1")  # a 2nd for one prompt
    Mask("neuron", {"down_blocks.9.attn.to_v": [1]}, {"prompt": cap}).save(tmp_path / "other" / "m")
    with pytest.raises(DoriError, match=re.escape(message)):
        SavedMasks(name, tmp_path / path).localize(tiny_pipe, cap)


SMALL = dict(seeds=[0], budgets=[0, 2], max_targets=2, control_per_kind=1, token_variants=0, fidelity_per_kind=1,
             attack={"pairs": 2}, num_inference_steps=4, detectors=[])


def test_attacking_saved_masks_gives_the_rows_of_the_mitigation_that_made_them(tmp_path):
    """Wanda's masks from one run, attacked as saved masks in another: the same triggers' rows, score for
    score; the source files are left as they were."""
    from dori.analyses.demo import run_demo

    first = run_demo(out=tmp_path / "a", stages=["generate", "wanda", "bypass"], **SMALL)
    src = tmp_path / "a" / "masks" / "wanda"
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    second = run_demo(out=tmp_path / "b", stages=["generate", "bypass"], masks={"w": str(src)}, **SMALL)

    def bypass(res, setting):
        return {(r["setting"].split("+")[1], r["budget"], r["caption"], r["seed"]): r["score"]
                for r in res["samples"] if r["stage"] == "bypass" and r["setting"].split("+")[0] == setting}

    a, b = bypass(first, "wanda"), bypass(second, "w")
    assert len(a) == 3 * 2 and a == b  # (DoRI at budgets 0 and 2, random) x 2 targets x 1 seed
    assert second["mitigations"]["w"]["table"] == [
        {**row, "seconds": row_b["seconds"]} for row, row_b in
        zip(first["mitigations"]["wanda"]["table"], second["mitigations"]["w"]["table"], strict=True)]
    assert {f.name: f.read_bytes() for f in src.iterdir()} == files
    trig = json.loads(next((tmp_path / "b" / "triggers" / "w").glob("*.json")).read_text())
    assert trig["params"]["mask"] in {Mask.load(f).digest() for f in src.glob("*.json")}
    with pytest.raises(DoriError, match="inside this run's masks folder"):
        run_demo(out=tmp_path / "a", stages=["generate", "bypass"], masks={"w2": str(src)}, **SMALL)
    with pytest.raises(DoriError, match="add 'generate' to the stages"):
        run_demo(out=tmp_path / "c", stages=["detect"], masks={"w": str(src)}, **SMALL)


def test_masks_from_the_command_line():
    from dori.cli import _named_paths

    assert _named_paths(["a=x/y", "b=z=1"]) == {"a": "x/y", "b": "z=1"}
    for bad, message in ((["x/y"], "NAME=PATH"), (["a=x", "a=y"], "names 'a' twice")):
        with pytest.raises(DoriError, match=message):
            _named_paths(bad)


def test_a_caption_listed_twice_is_refused_before_mitigating(tmp_path):
    from dori.analyses.demo import run_demo

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na red circle\n")
    with pytest.raises(DoriError, match=re.escape("lists 1 caption(s) more than once, e.g. 'a red circle'")):
        run_demo(out=tmp_path / "o", prompt_set=str(prompts), stages=["generate", "wanda"], **SMALL)
    assert not (tmp_path / "o" / "items").exists()  # refused before anything was generated
