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
from dori.reports.images import slug


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


def test_a_mask_file_name_may_hold_dots(tiny_pipe, tmp_path):
    cap = attack_targets(load_prompt_set("tiny"), 1)[0].caption
    mask = _save_masks(tiny_pipe, tmp_path / "f", [cap])[cap]
    mask.save(tmp_path / "wanda_0.11")
    assert sorted(f.name for f in tmp_path.glob("wanda_0.11*")) == ["wanda_0.11.json", "wanda_0.11.safetensors"]
    for given in ("wanda_0.11", "wanda_0.11.json", "wanda_0.11.safetensors"):
        assert SavedMasks("s", tmp_path / given).localize(tiny_pipe, cap).digest() == mask.digest()


@pytest.mark.parametrize("name, path, message", [
    ("wanda", "f", "not one of none, nemo, wanda, memorized, non-memorized"),
    ("Nemo", "f", "not one of none, nemo, wanda"),
    ("Non-Memorized", "f", "not one of none, nemo, wanda, memorized, non-memorized"),  # the table's own rows
    ("wanda-joint", "f", "not ending in -joint or -own"),
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
    score; its joint mask as one mask for every caption; the source files are left as they were."""
    from dori.analyses.demo import run_demo

    first = run_demo(out=tmp_path / "a", stages=["generate", "wanda", "bypass"], **SMALL)
    src = tmp_path / "a" / "masks" / "wanda"
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    joint = Mask.load(src / "_joint")
    second = run_demo(out=tmp_path / "b", stages=["generate", "bypass"], per_prompt_fidelity=True,
                      masks={"w": str(src), "j": str(src / "_joint.json")}, **SMALL)

    def bypass(res, setting):
        return {(r["setting"].split("+")[1], r["budget"], r["caption"], r["seed"]): r["score"]
                for r in res["samples"] if r["stage"] == "bypass" and r["setting"].split("+")[0] == setting}

    a, b = bypass(first, "wanda"), bypass(second, "w")
    assert len(a) == 3 * 2 and a == b  # (DoRI at budgets 0 and 2, random) x 2 targets x 1 seed
    assert second["mitigations"]["w"]["table"] == [
        {**row, "seconds": row_b["seconds"]} for row, row_b in
        zip(first["mitigations"]["wanda"]["table"], second["mitigations"]["w"]["table"], strict=True)]
    assert {f.name: f.read_bytes() for f in src.iterdir()} == files
    per_caption = {Mask.load(f).digest() for f in src.glob("*.json") if f.stem != "_joint"}
    assert {json.loads(f.read_text())["params"]["mask"] for f in (tmp_path / "b" / "triggers" / "w").glob("*.json")} \
        == per_caption
    # one mask for every caption: every target attacked through the joint mask, no per-prompt rows
    j_rows = [r for r in second["samples"] if r["setting"] in ("j", "j+dori")]
    assert len(j_rows) == 2 * 3 and {r["mask_size"] for r in j_rows} == {len(joint)}
    settings = {r["setting"] for r in second["samples"]}
    assert "w-own" in settings and "j-joint" in settings and "j-own" not in settings

    run_json = (tmp_path / "a" / "run.json").read_bytes()
    with pytest.raises(DoriError, match="is a mask folder this run writes"):
        run_demo(out=tmp_path / "a", stages=["generate", "wanda", "bypass"], masks={"w2": str(src)}, **SMALL)
    assert (tmp_path / "a" / "run.json").read_bytes() == run_json  # refused before anything was written
    with pytest.raises(DoriError, match="add 'generate' to the stages"):
        run_demo(out=tmp_path / "c", stages=["detect"], masks={"w": str(src)}, **SMALL)


def test_masks_from_the_command_line(monkeypatch, tmp_path):
    """`--masks NAME=PATH`; with --masks and no --mitigation only the saved masks are attacked."""
    from typer.testing import CliRunner

    import dori.analyses.demo as demo
    from dori.cli import _named_paths, app

    assert _named_paths(["a=x/y", "b=z=1"]) == {"a": "x/y", "b": "z=1"}
    for bad, message in ((["x/y"], "NAME=PATH"), (["a=x", "a=y"], "names 'a' twice")):
        with pytest.raises(DoriError, match=message):
            _named_paths(bad)
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or {"aggregates": {}})
    monkeypatch.setattr("dori.cli._print_results", lambda res, out: None)
    for extra in ([], ["--masks", "m=x"], ["--masks", "m=x", "--mitigation", "nemo"], ["--mitigation", "none"]):
        r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path), *extra])
        assert r.exit_code == 0, r.output
    assert [(c["stages"], c["masks"]) for c in calls] == [
        (["generate", "wanda", "bypass"], None), (["generate", "bypass"], {"m": "x"}),
        (["generate", "nemo", "bypass"], {"m": "x"}), (["generate", "bypass"], None)]
    r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path), "--masks", "m=x", "--mitigation", "none"])
    assert isinstance(r.exception, DoriError) and "--mitigation none attacks the model as it is, alone" in str(
        r.exception)


def test_a_target_listed_twice_is_refused_before_anything_runs(monkeypatch, tmp_path):
    import dataclasses

    import dori.analyses.demo as demo

    recs = load_prompt_set("tiny")
    unseen = next(r for r in recs if r.kind == "unseen")  # never mitigated nor attacked: may repeat
    monkeypatch.setattr(demo, "load_prompt_set", lambda *a: [*recs, dataclasses.replace(unseen)])
    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loaded")))
    with pytest.raises(RuntimeError, match="loaded"):  # past every input check
        demo.run_demo(out=tmp_path / "o", stages=["generate", "wanda"], **SMALL)
    target = attack_targets(recs, 1)[0]
    monkeypatch.setattr(demo, "load_prompt_set", lambda *a: [dataclasses.replace(target), *recs])
    with pytest.raises(DoriError, match=re.escape(f"lists 1 caption(s) to mitigate or attack more than once, e.g. "
                                                  f"{target.caption[:60]!r}")):
        demo.run_demo(out=tmp_path / "o", stages=["generate", "wanda"], **SMALL)


def _nemo_csv(path, rows):
    """The CSV NeMo's reference 3_detect_memorized_neurons.py writes: ';'-separated, lists as Python prints them."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Caption", "URL", "Initial Neurons", "Initial SSIM", "Refined Neurons", "Refined SSIM"])
        for caption, initial, refined in rows:
            w.writerow([caption, "http://x", str(initial), 0.3, str(refined), 0.2])
    return path


def test_neurons_found_by_nemos_reference_code_become_masks_the_benchmark_attacks(tiny_pipe, tmp_path):
    import torch

    from dori.mitigations.masks import apply_mask
    from dori.mitigations.nemo import import_reference_masks, read_reference_masks

    layers = resolve_layers(tiny_pipe.unet, "nemo-value")  # 4 on the tiny model
    found, skipped = [r.caption for r in attack_targets(load_prompt_set("tiny"), 2)]
    csv = _nemo_csv(tmp_path / "stats.csv", [(found, [[1, 3, 5], [], [2], [7]], [[3, 1, 3], [], [], [7]]),
                                             (skipped, [[]] * 4, [[]] * 4)])  # a prompt NeMo found not memorized
    masks = import_reference_masks(csv, tiny_pipe, tmp_path / "ref")
    assert {n: v.tolist() for n, v in masks[found].layers.items()} == {
        layers[0].name: [1, 3], layers[1].name: [], layers[2].name: [], layers[3].name: [7]}
    assert len(masks[skipped]) == 0 and masks[skipped].meta["skipped"] and not masks[found].meta["skipped"]
    initial = read_reference_masks(csv, tiny_pipe, neurons="initial")[found]
    assert initial.counts() == {layers[0].name: 3, layers[1].name: 0, layers[2].name: 1, layers[3].name: 1}

    saved = SavedMasks("nemo-ref", tmp_path / "ref")  # what `dori attack --masks nemo-ref=DIR` reads
    saved.require([found, skipped])
    saved.check(tiny_pipe, [found, skipped])
    mask = saved.localize(tiny_pipe, found)
    assert mask.digest() == masks[found].digest() and mask.kind == "neuron"
    x = torch.randn(1, 5, layers[0].module.in_features)
    with apply_mask(tiny_pipe, mask):
        y = layers[0].module(x)
    assert (y[..., [1, 3]] == 0).all() and (y[..., [0, 2, 4]] != 0).all()

    assert import_reference_masks(csv, tiny_pipe, tmp_path / "ref").keys() == masks.keys()  # repeated: same files
    other = _nemo_csv(tmp_path / "other.csv", [("another caption", [[1]] * 4, [[1]] * 4)])
    with pytest.raises(DoriError, match="already holds other masks"):
        import_reference_masks(other, tiny_pipe, tmp_path / "ref")
    own = tmp_path / "run" / "masks" / "nemo"  # dori's own NeMo masks of the same captions are never overwritten
    Mask("neuron", {layers[0].name: [9]}, {"prompt": found, "method": "nemo"}).save(own / slug(found))
    with pytest.raises(DoriError, match="already holds other masks"):
        import_reference_masks(csv, tiny_pipe, own)
    assert Mask.load(own / slug(found)).layers[layers[0].name].tolist() == [9]
    refined_empty = _nemo_csv(tmp_path / "emptied.csv", [(found, [[1]] * 4, [[]] * 4)])  # emptied by the refinement
    assert not read_reference_masks(refined_empty, tiny_pipe)[found].meta["skipped"]


@pytest.mark.parametrize("refined, message", [
    ([[1]] * 7, "7 layer lists, but this model's nemo-value group has 4 layers"),
    ([[1], [], [], [10_000]], "neuron 10000 is out of range for"),
    ([[1], ["a"], [], []], "must be a list of lists of neuron indices"),
    ([[True], [], [], []], "must be a list of lists of neuron indices"),
    ([[-1], [], [], []], "must be a list of lists of neuron indices"),
    ("tensor([1])", "must be a list of lists of neuron indices, got 'tensor([1])'"),
])
def test_a_nemo_reference_csv_that_does_not_fit_is_refused_naming_its_line(tiny_pipe, tmp_path, refined, message):
    from dori.mitigations.nemo import import_reference_masks

    csv = _nemo_csv(tmp_path / "stats.csv", [("a caption", [[]] * 4, [[]] * 4), ("b caption", [[]] * 4, refined)])
    with pytest.raises(DoriError, match=re.escape(message)) as e:
        import_reference_masks(csv, tiny_pipe, tmp_path / "ref")
    assert "line 3" in str(e.value) and not (tmp_path / "ref").exists()  # nothing written


def test_a_nemo_reference_csv_with_the_wrong_columns_or_rows_is_refused(tiny_pipe, tmp_path):
    from dori.mitigations.nemo import import_reference_masks, read_reference_masks

    f = tmp_path / "prompts.csv"
    f.write_text("Caption;URL;type;Index\na;u;VM;0\n")  # NeMo's prompt file, not its results
    with pytest.raises(DoriError, match=re.escape("lacks the column(s) ['Refined Neurons']")):
        read_reference_masks(f, tiny_pipe)
    twice = _nemo_csv(tmp_path / "twice.csv", [("a", [[]] * 4, [[1]] * 4), ("a", [[]] * 4, [[2]] * 4)])
    with pytest.raises(DoriError, match="line 3: the caption 'a' has two rows"):
        read_reference_masks(twice, tiny_pipe)
    ten = _nemo_csv(tmp_path / "ten.csv", [("a", [[]] * 10, [[]] * 9 + [[5]])])  # all 10 value projections
    assert read_reference_masks(ten, tiny_pipe, layer_group="value")["a"].counts()[
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v"] == 1  # the last layer in compute order
    with pytest.raises(DoriError, match="10 layer lists, but this model's nemo-value group has 4 layers"):
        read_reference_masks(ten, tiny_pipe)
    with pytest.raises(DoriError, match="neurons must be one of refined, initial"):
        read_reference_masks(twice, tiny_pipe, neurons="final")
    with pytest.raises(DoriError, match="not found"):
        read_reference_masks(tmp_path / "missing.csv", tiny_pipe)
    with pytest.raises(DoriError, match="not found .it is a folder"):
        read_reference_masks(tmp_path, tiny_pipe)
    header = tmp_path / "header.csv"
    header.write_text("Caption;URL;Initial Neurons;Initial SSIM;Refined Neurons;Refined SSIM\n")
    with pytest.raises(DoriError, match="holds no rows"):
        read_reference_masks(header, tiny_pipe)
    (tmp_path / "file").write_text("")
    with pytest.raises(DoriError, match="is a file: give a folder"):
        import_reference_masks(twice.with_name("ten.csv"), tiny_pipe, tmp_path / "file")


def test_a_nemo_reference_import_checks_its_inputs_before_the_model_loads(tmp_path, monkeypatch):
    import dori.models.loading
    from dori.mitigations.nemo import import_reference_masks

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(dori.models.loading, "load_pipeline", no_model)
    good = _nemo_csv(tmp_path / "stats.csv", [("a", [[]] * 7, [[1]] * 7)])
    bad = _nemo_csv(tmp_path / "bad.csv", [("a", [[]] * 7, "[[1], 'x']")])
    (tmp_path / "file").write_text("")
    for csv, out, group, message in [(bad, tmp_path / "o", "nemo-value", "line 2: Refined Neurons must be"),
                                     (good, tmp_path / "file", "nemo-value", "is a file"),
                                     (good, tmp_path / "o", "nemo-valu", "unknown layer group 'nemo-valu'")]:
        with pytest.raises(DoriError, match=re.escape(message)):
            import_reference_masks(csv, "CompVis/stable-diffusion-v1-4", out, layer_group=group)
    with pytest.raises(AssertionError, match="the model was loaded"):  # all good: now it loads
        import_reference_masks(good, "CompVis/stable-diffusion-v1-4", tmp_path / "o")


def test_a_nemo_reference_csv_is_read_as_the_reference_and_spreadsheets_write_it(tiny_pipe, tmp_path, monkeypatch):
    import dori.reports.images
    from dori.mitigations.nemo import import_reference_masks, read_reference_masks

    f = tmp_path / "stats.csv"  # a byte-order mark (a spreadsheet's save) and a caption over two lines
    f.write_text("\ufeffCaption;Refined Neurons\n\"two\nlines\";[[1], [], [], []]\nb;[[1], [], [], []]\n"
                 "c;[[1], [], [], [99999]]\n", encoding="utf-8")
    with pytest.raises(DoriError, match="line 5: neuron 99999"):  # the file's line, not the row's number
        read_reference_masks(f, tiny_pipe)
    f.write_text(f.read_text().replace("99999", "2"))
    assert list(read_reference_masks(f, tiny_pipe)) == ["two\nlines", "b", "c"]
    monkeypatch.setattr(dori.reports.images, "slug", lambda caption: "same")  # two captions, one file name
    with pytest.raises(DoriError, match="line 4: the captions 'two.nlines' and 'b' map to one mask file name"):
        import_reference_masks(f, tiny_pipe, tmp_path / "ref")
    assert not (tmp_path / "ref").exists()
