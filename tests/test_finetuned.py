"""A fine-tuned UNet as a mitigation (dori.mitigations.finetuned; `dori attack --finetuned NAME=PATH`):
its changed weights swapped in like a mask, measured and attacked like one, the rest on the unmitigated model."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from dori.analyses.mitigate import attack_targets
from dori.data.prompts import load_prompt_set
from dori.errors import DoriError
from dori.mitigations.finetuned import FineTunedUNet
from dori.mitigations.masks import Mask, SavedMasks, apply_mask
from dori.models.layers import resolve_layers

SMALL = dict(seeds=[0], budgets=[0, 2], max_targets=2, control_per_kind=1, token_variants=0, fidelity_per_kind=1,
             attack={"pairs": 2}, num_inference_steps=4, detectors=[])


def _value_rows_mask(pipe, rows: int = 12) -> Mask:
    """A weight mask zeroing the first ``rows`` rows of every cross-attention value layer."""
    layers = {}
    for layer in resolve_layers(pipe.unet, "nemo-value"):
        n_in = layer.module.in_features
        layers[layer.name] = torch.arange(rows * n_in)
    return Mask("weight", layers, {"method": "hand"})


def _save_unet(pipe, folder, mask: Mask | None = None):
    """The tiny model's UNet saved as diffusers does (config.json + safetensors), under ``mask`` if given:
    what fine-tuning to those weights would have written."""
    with apply_mask(pipe, mask):
        pipe.unet.save_pretrained(folder)
    return folder


def test_a_finetuned_unet_is_measured_and_attacked_like_the_mask_it_equals(tiny_pipe, tmp_path):
    """A UNet whose value layers were pruned and saved, given as a fine-tune, gives the rows of the same
    pruning given as a mask, score for score: the before/after table, the side effects, every bypass row."""
    from dori.analyses.demo import run_demo

    mask = _value_rows_mask(tiny_pipe)
    mask.save(tmp_path / "m")
    _save_unet(tiny_pipe, tmp_path / "ft" / "unet", mask)
    (tmp_path / "ft" / "model_index.json").write_text("{}")  # a pipeline folder: its unet/ is read
    args = dict(out=tmp_path / "run", stages=["generate", "bypass"], masks={"m": str(tmp_path / "m")},
                finetuned={"f": str(tmp_path / "ft")}, **SMALL)
    res = run_demo(**args)

    def rows_of(res, name):
        return {(r["stage"], r["setting"].replace(name, "X", 1), r["budget"], r["caption"], r["seed"]): r["score"]
                for r in res["samples"] if r["setting"].split("+")[0] in (name, f"{name}-joint")}

    def rows(name):
        return rows_of(res, name)

    m, f = rows("m"), rows("f")
    # 2 targets: mitigated, DoRI at budgets 0 and 2, random; 4 side-effect captions under the joint weights
    assert len(m) == 2 * 4 + 4 and m == f
    assert {r["mask_size"] for r in res["samples"] if r["setting"] == "f+dori"} == {len(mask)}
    tm, tf = res["mitigations"]["m"], res["mitigations"]["f"]
    assert [{**r, "seconds": None} for r in tm["table"]] == [{**r, "seconds": None} for r in tf["table"]]
    assert tf["summary"]["mask_kind"] == "patch" and tf["summary"]["joint_mask_size"] == len(mask)
    assert tf["summary"]["non_memorized_similarity_to_unmitigated"] == \
        tm["summary"]["non_memorized_similarity_to_unmitigated"]
    labels = [r["setting"] for r in res["bypass"]["table"]]
    assert {"f", "f + DoRI (2 steps)", "memorized (no mitigation)"} <= set(labels)
    # the run records the fine-tune, not a copy of its weights; the record is no mask
    record = json.loads((tmp_path / "run" / "masks" / "f" / "_joint.json").read_text())
    assert record["kind"] == "patch" and record["meta"]["method"] == "f" and record["digest"]
    assert not list((tmp_path / "run" / "masks" / "f").glob("*.safetensors"))
    with pytest.raises(DoriError, match="records a fine-tuned UNet"):
        SavedMasks("x", tmp_path / "run" / "masks" / "f" / "_joint.json")
    assert "weights changed" in (tmp_path / "run" / "report.html").read_text()
    assert f"digest={record['digest']!r}" in tf["summary"]["method"]
    images = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.png") if "plots" not in p.parts}
    again = run_demo(**args)  # started again: the fine-tune's items are found under its digest, nothing redone
    assert again["samples"] == res["samples"]
    assert {p: p.stat().st_mtime_ns for p in images} == images

    # the fine-tune's weights never reach the rows of the unmitigated model: the control attacked after it
    # is the control of a run without it
    alone = run_demo(**{**args, "out": tmp_path / "alone", "finetuned": None})

    def control(r):
        return {(x["setting"], x["budget"], x["caption"], x["seed"]): x["score"] for x in r["samples"]
                if x["setting"].startswith("none+") and x["kind"] != "memorized"}

    assert control(alone) and control(alone) == control(res)
    # another fine-tune in the same folder is another mitigation: its rows are made again, the mask's reused
    _save_unet(tiny_pipe, tmp_path / "ft" / "unet", _value_rows_mask(tiny_pipe, rows=24))
    other = run_demo(**args)
    assert rows("m") == m and rows_of(other, "f") != f


def test_the_patch_holds_only_changed_weights_and_the_model_is_restored_bit_exactly(tiny_pipe, tmp_path,
                                                                                      weights_hash):
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    param = dict(tiny_pipe.unet.named_parameters())[name]
    tuned = {n: p.detach().contiguous().clone() for n, p in tiny_pipe.unet.named_parameters()}
    tuned[name][:3] += 0.5  # three rows changed, every other parameter as it is
    save_file(tuned, str(tmp_path / "unet.safetensors"))
    ft = FineTunedUNet("ft", tmp_path / "unet.safetensors")
    before = weights_hash(tiny_pipe.unet)
    cap = attack_targets(load_prompt_set("tiny"), 1)[0].caption
    patch = ft.localize(tiny_pipe, cap)
    assert list(patch.layers) == [name] and len(patch) == 3 * param.shape[1] and patch.meta["prompt"] == cap
    assert patch.union(ft.localize(tiny_pipe, "another")).digest() == patch.digest()
    with apply_mask(tiny_pipe, patch):
        assert torch.equal(param.detach(), tuned[name])
    assert weights_hash(tiny_pipe.unet) == before
    with pytest.raises(RuntimeError, match="inside"), apply_mask(tiny_pipe, patch):
        raise RuntimeError("inside")  # restored on an error too
    assert weights_hash(tiny_pipe.unet) == before
    tuned[name] = param.detach().clone()  # the model's own weights
    save_file(tuned, str(tmp_path / "same.safetensors"))
    same = FineTunedUNet("same", tmp_path / "same.safetensors").localize(tiny_pipe, cap)
    assert len(same) == 0 and patch.digest() != same.digest()
    with pytest.raises(DoriError, match="two different fine-tunes"):
        patch.union(same)
    # saved in half precision: only the weights the fine-tune changed count, the others keep the model's values
    tuned[name][:3] += 0.5
    save_file({n: t.half() for n, t in tuned.items()}, str(tmp_path / "half.safetensors"))
    half = FineTunedUNet("half", tmp_path / "half.safetensors").localize(tiny_pipe, cap)
    assert half.counts() == patch.counts()
    assert torch.equal(half.layers[name][3:], param.detach()[3:])
    assert torch.equal(half.layers[name][:3], tuned[name][:3].half().float())


@pytest.mark.parametrize("case, message", [
    ("nowhere", "not found; give a diffusers pipeline folder"),
    ("pickle", "a pickle, which dori never loads"),
    ("missing", "1 of the model's parameters missing, e.g. 'conv_in.bias'"),
    ("extra", "1 parameters the model lacks, e.g. 'extra.weight'"),
    ("shape", "1 of another shape, e.g. 'conv_in.bias'"),
    ("text", "its text encoder differs from the model's"),
    ("text-pickle", "its text encoder has no safetensors weights"),
    ("name", "fine-tune name 'wanda': use letters"),
])
def test_bad_finetuned_unets_are_one_clear_error(tiny_pipe, tmp_path, case, message):
    state = {n: p.detach().contiguous().clone() for n, p in tiny_pipe.unet.named_parameters()}
    path, name = tmp_path / case, "ft"
    if case == "pickle":
        path.mkdir()
        (path / "config.json").write_text("{}")
        (path / "diffusion_pytorch_model.bin").write_bytes(b"")
    elif case in ("missing", "extra", "shape"):
        path.mkdir()
        if case == "missing":
            del state["conv_in.bias"]
        elif case == "extra":
            state["extra.weight"] = torch.zeros(2)
        else:
            state["conv_in.bias"] = torch.zeros(3)
        save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    elif case.startswith("text"):
        _save_unet(tiny_pipe, path / "unet")
        tiny_pipe.text_encoder.save_pretrained(path / "text_encoder")
        te = {n: p.detach().contiguous().clone() for n, p in tiny_pipe.text_encoder.state_dict().items()}
        first = next(iter(te))
        te[first] = te[first] + 1
        save_file(te, str(path / "text_encoder" / "model.safetensors"))
        if case == "text-pickle":
            (path / "text_encoder" / "model.safetensors").rename(path / "text_encoder" / "pytorch_model.bin")
    elif case == "name":
        name = "wanda"
        _save_unet(tiny_pipe, path)
    with pytest.raises(DoriError, match=re.escape(message)):
        FineTunedUNet(name, path).check(tiny_pipe, [])


def test_a_pipeline_folder_with_the_models_own_text_encoder_is_taken(tiny_pipe, tmp_path):
    _save_unet(tiny_pipe, tmp_path / "ft" / "unet")
    te = tmp_path / "ft" / "text_encoder"
    tiny_pipe.text_encoder.save_pretrained(te)
    ft = FineTunedUNet("ft", tmp_path / "ft")
    ft.check(tiny_pipe, [])
    assert len(ft.patch(tiny_pipe)) == 0  # the model's own weights: nothing changed (a warning says so)
    # the same weights under the key names of older transformers (SD v1.4's files): the same text encoder
    state = {f"text_model.{n}": p.detach().contiguous().clone() for n, p in tiny_pipe.text_encoder.state_dict().items()}
    save_file(state, str(te / "model.safetensors"))
    FineTunedUNet("ft", tmp_path / "ft").check(tiny_pipe, [])


def test_finetuned_from_the_command_line(monkeypatch, tmp_path):
    """`--finetuned NAME=PATH`: with it and no --mitigation only the fine-tune is attacked."""
    from typer.testing import CliRunner

    import dori.analyses.demo as demo
    from dori.cli import app

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or {"aggregates": {}})
    monkeypatch.setattr("dori.cli._print_results", lambda res, out: None)
    for extra in (["--finetuned", "f=x"], ["--finetuned", "f=x", "--masks", "m=y", "--mitigation", "nemo"]):
        r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path), *extra])
        assert r.exit_code == 0, r.output
    assert [(c["stages"], c["masks"], c["finetuned"]) for c in calls] == [
        (["generate", "bypass"], None, {"f": "x"}), (["generate", "nemo", "bypass"], {"m": "y"}, {"f": "x"})]
    for extra, message in ((["--finetuned", "f=x", "--mitigation", "none"], "--mitigation none attacks the model"),
                           (["--finetuned", "x"], "--finetuned takes NAME=PATH")):
        r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path), *extra])
        assert isinstance(r.exception, DoriError) and message in str(r.exception)
