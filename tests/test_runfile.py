import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from dori.analyses.runfile import RUN_DEFAULTS, load_run_file
from dori.errors import DoriError


def test_a_run_file_takes_the_attack_defaults_and_rejects_bad_keys(tmp_path):
    f = tmp_path / "study.toml"
    f.write_text('out = "runs/study"\nstages = ["generate", "wanda", "bypass"]\n'
                 '[method_params.wanda]\nsparsity = 0.1\n')
    args = load_run_file(f)
    assert args == {**RUN_DEFAULTS, "out": "runs/study", "stages": ["generate", "wanda", "bypass"],
                    "method_params": {"wanda": {"sparsity": 0.1}}}
    assert load_run_file(f, out=tmp_path / "o")["out"] == str(tmp_path / "o")
    for text, message in [
        ('out = "o"\nsparsity = 0.1', "unknown key(s) ['sparsity']"),
        ('stages = ["generate"]', "names no run directory"),
        ('out = "o"\nseeds = "0,1"', "seeds must be a list of integers"),
        ('out = "o"\n[attack]\nstep = 10', "attack has no parameter(s) ['step']; DoRI takes steps"),
        ('out = "o"\nseeds = [0, 1', "is not valid TOML"),
    ]:
        f.write_text(text)
        with pytest.raises(DoriError, match=re.escape(message)):
            load_run_file(f)
    with pytest.raises(DoriError, match="holds no run.json or results.json"):
        load_run_file(tmp_path)
    with pytest.raises(DoriError, match="not found"):
        load_run_file(tmp_path / "missing.toml")


def test_the_documented_run_file_is_valid(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    toml = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "study.toml").write_text(toml)
    args = load_run_file(tmp_path / "study.toml")
    assert args["metric"] == "sscd-nemo" and args["method_params"] == {"wanda": {"sparsity": 0.01}}
    assert args["attack"] == {"restarts": 1} and args["stages"] == ["generate", "nemo", "wanda", "bypass"]


@pytest.mark.parametrize("text, message", [
    ('out = "o"\nseed = [0]', "unknown key(s) ['seed'] (seed: did you mean seeds?)"),
    ('out = "o"\nmax_targets = "3"', "max_targets must be an integer, got '3'"),
    ('out = "o"\nper_prompt_fidelity = "no"', "per_prompt_fidelity must be true or false"),
    ('out = "o"\nstages = ["generate", 3]', "stages must be a list of texts"),
    ('out = "o"\n[attack]\nrestarts = "1"', "attack.restarts must be an integer"),
    ('out = "o"\n[attack]\ninit = "bogus"', "attack: init must be 'prompt', 'random' or 'embeds'"),
    ('out = "o"\n[method_params.wandaa]\nsparsity = 0.1', "method_params has tables for ['wandaa']"),
    ('out = "o"\n[masks]\nmine = 3', "masks must be a table of texts, got {'mine': 3}"),
])
def test_a_wrong_value_is_named_before_anything_runs(tmp_path, text, message):
    f = tmp_path / "study.toml"
    f.write_text(text)
    with pytest.raises(DoriError, match=re.escape(message)):
        load_run_file(f)


def test_run_json_is_written_before_the_run_and_resumes_it(tmp_path, monkeypatch):
    import dori.analyses.demo as demo

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill, while the model loads

    monkeypatch.setattr(demo, "load_pipeline", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out=out, seeds=(2, 5), stages=["generate", "wanda"], method_params={"wanda": {"sparsity": 0.2}})
    args = load_run_file(out)  # what `dori run DIR` would start again
    assert args["out"] == str(out) and args["seeds"] == [2, 5] and args["stages"] == ["generate", "wanda"]
    assert args["method_params"] == {"wanda": {"sparsity": 0.2}} and args["attack"] == demo.DEMO_ATTACK
    moved = tmp_path / "moved"
    (out / "run.json").rename(tmp_path / "run.json")
    assert load_run_file(tmp_path / "run.json")["out"] == str(tmp_path)  # a recorded file's folder is its run
    assert load_run_file(tmp_path / "run.json", out=moved)["out"] == str(moved)
    older = json.loads((tmp_path / "run.json").read_text())
    del older["early_stop"]  # a run.json written before early stop existed repeats a run without it
    (tmp_path / "run.json").write_text(json.dumps(older))
    assert load_run_file(tmp_path / "run.json")["early_stop"] is False



def test_a_run_records_its_local_paths_absolute_and_resumes_from_another_directory(tmp_path, monkeypatch, caplog):
    from PIL import Image

    import dori.analyses.demo as demo
    from dori.mitigations.masks import Mask

    loaded = []

    def killed(model, **k):
        loaded.append(model)
        raise KeyboardInterrupt  # the kill, while the model loads

    monkeypatch.setattr(demo, "load_pipeline", killed)
    start, elsewhere = tmp_path.resolve() / "start", tmp_path.resolve() / "elsewhere"
    for d in (start / "models" / "sd", start / "refs", elsewhere / "models" / "sd", elsewhere / "tiny"):
        d.mkdir(parents=True)
    (start / "captions.csv").write_text("Caption;URL;type;Index\na red bicycle;u;VM;1\n")  # a NeMo prompt file
    (start / "link.csv").symlink_to(start / "captions.csv")  # e.g. a hub cache's file: a link to a nameless blob
    Image.new("RGB", (8, 8)).save(start / "refs" / "1.png")
    (start / "sscd.pt").write_bytes(b"")
    Mask("neuron", {"x": [1]}, {"prompt": "a red bicycle"}).save(start / "mine")  # named without its suffix
    monkeypatch.chdir(start)
    given = dict(model="models/sd", prompt_set="link.csv", images_dir="refs", sscd_path="sscd.pt",
                 stats_prompts="tiny", masks={"mine": "mine"})
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out="run", seeds=(0,), stages=["generate"], **given)
    monkeypatch.chdir(elsewhere)  # a folder with a model of the same relative name, which must not be taken
    args = load_run_file(start / "run")
    assert {k: args[k] for k in given} == dict(
        model=str(start / "models" / "sd"), prompt_set=str(start / "link.csv"), images_dir=str(start / "refs"),
        sscd_path=str(start / "sscd.pt"), stats_prompts="tiny",  # a registered name stays a name
        masks={"mine": str(start / "mine")})  # the link is kept: its name is what the reader goes by
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(**args)  # `dori run DIR` from elsewhere
    assert loaded == [str(start / "models" / "sd")] * 2
    with pytest.raises(KeyboardInterrupt):  # names, hub ids, missing paths and "" are kept as written
        demo.run_demo(out="run2", seeds=(0,), stages=["generate"], model="org/not-here", stats_prompts="nowhere.txt",
                      sscd_path="")
    recorded = json.loads((elsewhere / "run2" / "run.json").read_text())
    assert [recorded[k] for k in ("model", "stats_prompts", "prompt_set", "sscd_path")] == [
        "org/not-here", "nowhere.txt", "tiny", ""]
    (elsewhere / "org" / "not-here").mkdir(parents=True)  # a folder now takes the hub id's name: said on resume
    with caplog.at_level(logging.WARNING, logger="dori.analyses.runfile"):
        assert load_run_file(elsewhere / "run2")["model"] == "org/not-here"
    assert "names the model 'org/not-here' as written" in caplog.text and str(elsewhere / "org") in caplog.text
    with pytest.raises(KeyboardInterrupt):  # "tiny" is the shipped model even beside a folder named tiny
        demo.run_demo(out="run3", seeds=(0,), stages=["generate"])
    assert loaded[-1] == "tiny"


def test_the_bypass_refuses_a_run_without_a_control_and_takes_one_from_control_prompts(tmp_path, monkeypatch):
    """SD's memorized prompt sets hold no non-memorized image: the bypass would have no control, so it is refused
    before the model loads, unless --control-prompts gives one."""
    from PIL import Image

    import dori.analyses.demo as demo

    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "mem.csv").write_text("Caption;URL;type;Index\nThe Colosseum;u;VM;17\n")
    (tmp_path / "unmem.csv").write_text(";Caption;URL;Index\n0;A field;u;18\n")
    for folder, index in (("mem", 17), ("unmem", 18)):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / f"{index}.png")
    run = dict(out=tmp_path / "run", prompt_set=str(tmp_path / "mem.csv"), images_dir=str(tmp_path / "mem"),
               stages=["generate", "bypass"])
    with pytest.raises(DoriError, match="this run has none.*--control-prompts FILE --control-images-dir DIR"):
        demo.run_demo(**run)
    with pytest.raises(DoriError, match=r"this run has none \(control_per_kind is 0\)"):
        demo.run_demo(**run, control_per_kind=0, control_prompts=str(tmp_path / "unmem.csv"),
                      control_images_dir=str(tmp_path / "unmem"))
    control = dict(control_prompts=str(tmp_path / "unmem.csv"), control_images_dir=str(tmp_path / "unmem"))
    with pytest.raises(KeyboardInterrupt):  # past every check: the model would load now
        demo.run_demo(**run, **control)
    assert {k: load_run_file(tmp_path / "run")[k] for k in control} == control  # recorded, to resume
    with pytest.raises(KeyboardInterrupt):  # a run without the bypass needs no control
        demo.run_demo(**{**run, "stages": ["generate"]})
    with pytest.raises(DoriError, match=r"budgets must be DoRI step counts, 0 or more, at least one; got \[\]"):
        demo.run_demo(**run, **control, budgets=[])
    # NeMo's statistics prompts may be NeMo's unmemorized file itself (no type column), read before the model
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(**{**run, "stages": ["generate", "nemo"]}, stats_prompts=str(tmp_path / "unmem.csv"))
    (tmp_path / "bad.csv").write_text("Caption,URL\n")
    with pytest.raises(DoriError, match="bad.csv is not a valid NeMo CSV"):
        demo.run_demo(**{**run, "stages": ["generate", "nemo"]}, stats_prompts=str(tmp_path / "bad.csv"))
    (tmp_path / "mem" / "17.png").unlink()  # the targets' images missing: said first, naming --images-dir
    with pytest.raises(DoriError, match="none of its 1 memorized prompts has its reference image on disk .check "
                                        "--images-dir"):
        demo.run_demo(**run, **control)


def test_a_recorded_file_must_hold_every_argument(tmp_path):
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"manifest": {"config": {"model": "tiny", "seeds": [0]}}}))
    with pytest.raises(DoriError, match="written by an older dori and lacks .*images_dir"):
        load_run_file(f)
    f.write_text(json.dumps({"manifest": "x"}))
    with pytest.raises(DoriError, match="has no manifest config"):
        load_run_file(f)
    j = tmp_path / "study.json"
    j.write_text(json.dumps({"out": "o", "seeds": [0, 1], "stages": ["generate"]}))
    assert load_run_file(j)["seeds"] == [0, 1]


def test_a_run_file_names_saved_masks(tmp_path):
    f = tmp_path / "study.toml"
    f.write_text('out = "o"\n[masks]\nmine = "runs/a/masks/wanda"\ndeployed = "runs/a/masks/wanda/_joint.json"\n')
    assert load_run_file(f)["masks"] == {"mine": "runs/a/masks/wanda", "deployed": "runs/a/masks/wanda/_joint.json"}


def test_an_sscd_metric_without_its_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import dori.analyses.demo as demo

    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for kwargs, message in [({"metric": "sscd-nemo"}, "needs a local SSCD TorchScript file: pass --sscd"),
                            ({"metric": "sscd-wen", "sscd_path": str(tmp_path / "no.pt")}, "SSCD model file not found"),
                            ({"metric": "sscd-nemmo"}, "unknown metric 'sscd-nemmo'. Did you mean 'sscd-nemo'")]:
        with pytest.raises(DoriError, match=re.escape(message)):
            demo.run_demo(out=tmp_path / "run", stages=["generate"], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": ()}, "give at least one sampling seed"),
    ({"stages": []}, "stages: give at least one of generate"),
    ({"num_inference_steps": 0}, "sampling steps must be 1 or more, got 0"),
    ({"guidance_rescale": 2.0}, "guidance rescale must be between 0 and 1, got 2.0"),
    ({"images_dir": "/nonexistent/refs"}, "images folder /nonexistent/refs not found (--images-dir)"),
    ({"attack": {"pairs": 0}}, "attack: steps must be >= 0, pairs, restarts and check_every >= 1; got steps=50"),
    ({"attack": {"lr": -1.0}}, "attack: lr must be positive, got -1.0"),
    ({"attack": {"step": 3}}, "attack: DoRI.__init__() got an unexpected keyword argument 'step'"),
    ({"device": "gpu"}, "device 'gpu' is not a device"),
    ({"method_params": {"nemo": {"theta": "3"}}, "stages": ["generate", "nemo"]}, "nemo.theta must be a number"),
    ({"model": "SD"}, "metric 'sscd-nemo' needs a local SSCD TorchScript file"),  # SD's default metric
])
def test_settings_that_cannot_run_are_refused_before_the_model_loads(tmp_path, monkeypatch, kwargs, message):
    import dori.analyses.demo as demo

    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "SD").mkdir()  # a latent model's folder: its index names an AutoencoderKL
    (tmp_path / "SD" / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DoriError, match=re.escape(message)):
        demo.run_demo(out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # nothing recorded, no folder made, for a run that cannot run


def test_an_out_that_cannot_be_a_folder_is_one_clear_error(tmp_path, monkeypatch):
    import dori.analyses.demo as demo

    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "file").write_text("")
    with pytest.raises(DoriError, match="cannot make the run directory .*file: File exists"):
        demo.run_demo(out=tmp_path / "file", stages=["generate"])
    (tmp_path / "theirs").mkdir()  # an existing folder this user cannot write (as root, chmod would not show it)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "theirs" and real_access(p, mode))
    with pytest.raises(DoriError, match="cannot read and write in the run directory .*theirs: give --out a folder"):
        demo.run_demo(out=tmp_path / "theirs", stages=["generate"])


@pytest.mark.parametrize("kwargs", [
    {"guidance_scale": 0.0}, {"guidance_scale": 0.5}, {"seeds": range(2)}, {"seeds": [3]},
    {"method_params": {"wanda": {"seeds": (0, 1), "sparsity": np.float32(0.1)}, "nemo": {"theta": np.float64(3)}}},
    {"stages": ["detect"], "metric": "sscd-nemo"},  # detection alone scores no image: no SSCD file needed
])
def test_valid_settings_still_reach_the_model(tmp_path, monkeypatch, kwargs):
    import dori.analyses.demo as demo

    monkeypatch.setattr(demo, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out=tmp_path / "run", **kwargs)
