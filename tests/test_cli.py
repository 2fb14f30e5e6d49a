import logging
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dori.cli import QUIET_LOGGERS, QUIET_VERBOSITY, app, main


def test_ls_lists_registries():
    r = CliRunner().invoke(app, ["ls"])
    assert r.exit_code == 0
    for name in ("tiny", "pixel-ssim", "sscd-nemo", "sscd-wen", "nemo-value"):
        assert name in r.output


def test_help_and_the_command_line_load_without_torch(tmp_path):
    """`dori --help` and the options' own checks wait for no heavy import (torch, diffusers: about 6 s)."""
    code = ("import atexit, sys; atexit.register(lambda: print('heavy:', sorted({'torch', 'diffusers', "
            "'transformers'} & set(sys.modules)))); from dori.cli import main; main()")

    def dori(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)

    r = dori("--help")
    assert r.returncode == 0 and "attack" in r.stdout
    assert r.stdout.strip().endswith("heavy: []"), r.stdout[-300:]
    for args, message in ((["attack", "--mitigation", "foo"], "--mitigation takes nemo, wanda or none"),
                          (["demo", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
                          (["mitigate", "--method", "wanda", "--param", "sparsity=0.1"], "METHOD.KEY=VALUE"),
                          (["import-nemo", "x.csv", "--neurons", "final"], "--neurons must be refined or initial")):
        r = dori(*args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stdout.strip().endswith("heavy: []"), (args, r.stdout[-300:])


@pytest.fixture
def dori_cli(monkeypatch, capsys):
    """`dori ARGS` through `main()` in this process: its exit code and stderr, as a finished process gives
    them, without a new interpreter's 6 s of imports each time (the real process: the test below). An
    exception that `main()` lets through fails the test with its traceback."""
    levels = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}  # main() quiets them
    for var in QUIET_VERBOSITY:  # and sets these if unset: undone after the test
        monkeypatch.setenv(var, os.environ.get(var, "error"))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["dori", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    yield run
    for name, level in levels.items():  # the rest of the session gets them back
        logging.getLogger(name).setLevel(level)


def test_bad_input_is_one_clear_error_and_exit_2(tmp_path, dori_cli):
    from dori.mitigations.masks import Mask

    Mask("neuron", {"down_blocks.9.attn2.to_v": [1]}).save(tmp_path / "alien")  # found once the model is loaded
    code = ("import atexit, logging; atexit.register(lambda: print('levels:', [logging.getLogger(n).level for n "
            "in ('diffusers', 'transformers')])); from dori.cli import main; main()")  # the real process, once
    r = subprocess.run([sys.executable, "-c", code, "attack", "--out", str(tmp_path / "o"), "--masks",
                        f"alien={tmp_path / 'alien.json'}"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in QUIET_VERBOSITY})  # as a user's shell
    assert r.returncode == 2
    assert "error:" in r.stderr and "is not a linear layer of this UNet" in r.stderr
    assert "Traceback" not in r.stderr
    # the libraries' warnings stay quiet, though they are imported after main() quiets them
    assert r.stdout.strip().endswith(f"levels: {[logging.ERROR] * 2}") and "Expected types" not in r.stderr
    r = dori_cli("demo", "--out", str(tmp_path / "o"), "--prompts", "tinny")
    assert r.returncode == 2 and "Did you mean 'tiny'" in r.stderr
    r = dori_cli("demo", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_mitigation_parameters_from_the_command_line(tmp_path, dori_cli):
    from dori.cli import _method_params

    assert _method_params(["wanda.sparsity=0.1", "wanda.layer_group=value", "nemo.seed=3"]) == {
        "wanda": {"sparsity": 0.1, "layer_group": "value"}, "nemo": {"seed": 3}}
    r = dori_cli("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", "sparsity=0.1")
    assert r.returncode == 2 and "METHOD.KEY=VALUE" in r.stderr
    r = dori_cli("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", "wanda.sparsty=0.1")
    assert r.returncode == 2 and "wanda has no parameter ['sparsty']" in r.stderr and "sparsity" in r.stderr
    r = dori_cli("attack", "--out", str(tmp_path / "o"), "--mitigation", "wanda", "--param", "nemo.threshold=0.3")
    assert r.returncode == 2 and "parameters given for nemo, which this run does not use" in r.stderr
    r = dori_cli("mitigate", "--method", "nemo", "--out", str(tmp_path / "o"), "--param", "nemo.threshold=abc")
    assert r.returncode == 2 and "nemo.threshold must be a number, got 'abc'" in r.stderr  # before the model loads
    for bad in ("wanda.sparsity=2", "wanda.layer_group=valu"):
        r = dori_cli("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", bad)
        assert r.returncode == 2, r.stderr
        assert "bad parameter value" in r.stderr or "Did you mean 'value'" in r.stderr
    assert not (tmp_path / "o" / "items").exists()  # every error came before the first stage


def test_detect_scores_every_caption_without_generating_images(tmp_path, dori_cli):
    import json

    out = tmp_path / "det"
    r = dori_cli("detect", "--out", str(out), "--detectors", "seed-consistency")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    [det] = res["detection"]
    assert det["name"] == "seed-consistency" and len(det["scores"]) == len(res["prompts"])
    assert det["auroc"] >= 0.95 and 0 <= det["flagged_others"] < det["flagged_memorized"] == 1.0
    assert res["samples"] == [] and res["metric"] is None and not (out / "images").exists()
    assert (out / "plots" / "roc.png").is_file() and "SeedConsistency" in (out / "report.html").read_text()
    r = dori_cli("detect", "--out", str(out), "--detectors", "noise-magnitude,foo")
    assert r.returncode == 2 and "unknown detector 'foo'" in r.stderr
    plain = tmp_path / "prompts.txt"  # plain prompts carry no memorized label: nothing to compare
    plain.write_text("a red circle on a blue background\na cat\n")
    r = dori_cli("detect", "--out", str(tmp_path / "det2"), "--prompts", str(plain))
    assert r.returncode == 2 and "has no memorized ones" in r.stderr


def test_demo_sizes_default_to_the_demo_module_and_zero_means_all(monkeypatch, tmp_path):
    """`dori demo` passes --targets/--fidelity-per-kind only when given (run_demo's DEMO_* apply otherwise);
    `dori attack` passes --attack-seed."""
    import dori.analyses.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or {"aggregates": {}})
    monkeypatch.setattr("dori.cli._print_analyses", lambda res, out: None)
    for extra in ([], ["--targets", "0", "--fidelity-per-kind", "0"], ["--targets", "2"]):
        r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), *extra])
        assert r.exit_code == 0, r.output
    unset, zero, two = calls
    assert "max_targets" not in unset and "fidelity_per_kind" not in unset
    assert zero["max_targets"] is None and zero["fidelity_per_kind"] is None
    assert two["max_targets"] == 2 and "fidelity_per_kind" not in two
    monkeypatch.setattr("dori.cli._print_results", lambda res, out: None)
    for extra in ([], ["--attack-seed", "3"]):  # `dori attack` passes its attack seed on (default 0)
        r = CliRunner().invoke(app, ["attack", "--out", str(tmp_path), *extra])
        assert r.exit_code == 0, r.output
    assert [c["attack_seed"] for c in calls[3:]] == [0, 3]
    for command in ("demo", "attack"):  # the control for a prompt set without one
        r = CliRunner().invoke(app, [command, "--out", str(tmp_path), "--control-prompts", "unmem.csv",
                                     "--control-images-dir", "unmem"])
        assert r.exit_code == 0, r.output
        assert (calls[-1]["control_prompts"], calls[-1]["control_images_dir"]) == ("unmem.csv", "unmem")
    assert calls[0]["control_prompts"] is None


def test_train_tiny_options_reach_the_recipe_and_unset_ones_keep_its_defaults(monkeypatch, tmp_path):
    import dori.zoo.train_tiny as recipe

    seen = []
    monkeypatch.setattr(recipe, "train_tiny", lambda cfg: seen.append(cfg))
    args = ["zoo", "train-tiny", "--out", str(tmp_path / "m")]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, [*args, "--steps", "4500", "--procedural-layout", "centred", "--n-procedural",
                                 "5000", "--crop-template-captions", "1.0"])
    assert r.exit_code == 0, r.output
    default, changed = seen
    assert default == recipe.TrainConfig(out=str(tmp_path / "m"))
    assert (changed.steps, changed.data.procedural_layout, changed.data.n_procedural,
            changed.data.crop_template_captions) == (4500, "centred", 5000, 1.0)
    assert changed.data.duplicates == default.data.duplicates
    r = CliRunner().invoke(app, [*args, "--procedural-layout", "center"])
    assert r.exit_code == 2 and "anywhere, centred" in r.output and len(seen) == 2


def test_a_file_this_user_cannot_write_is_one_clear_error(tmp_path, dori_cli, monkeypatch):
    import dori.analyses.demo as demo

    def denied(**kwargs):  # e.g. an item folder of the run made by another user
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "items" / "a.json"))

    monkeypatch.setattr(demo, "run_demo", denied)
    r = dori_cli("demo", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    denied_file = tmp_path / "run" / "items" / "a.json"
    assert f"Permission denied: {denied_file}; run as a user who" in " ".join(r.stderr.split())
    monkeypatch.setattr(demo, "run_demo", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    r = dori_cli("demo", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "error: [Errno 13] Permission denied; run as a user who" in r.stderr


def test_brackets_in_messages_and_names_are_printed_as_written(tmp_path, dori_cli, monkeypatch):
    """rich reads "[x]" as markup and drops it: an install hint `dori[parquet]` became `dori`."""
    import dori.analyses.demo as demo
    from dori.errors import DoriError

    monkeypatch.setattr(demo, "run_demo", lambda **kw: (_ for _ in ()).throw(DoriError("pip install dori[parquet]")))
    r = dori_cli("demo", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "pip install dori[parquet]" in r.stderr
    row = {"n_images": 1, "mr": 1.0, "mr_any_seed": 1.0, "score_mean": 0.7, "score_std": 0.0}
    res = {"aggregates": {"bypass/mine[v2]+dori@50/memorized": row}, "metric": {"name": "pixel-ssim", "threshold": 0.5},
           "bypass": {"attack": "DoRI(steps=50)", "curves": {"mine[v2]+dori memorized": {"budget": [50], "mr": [1.0]}},
                      "table": [{"setting": "mine[v2] + DoRI (50 steps)", **row},
                                {"setting": "non-memorized-v2 + DoRI (50 steps)", **row},  # a mask set's name
                                {"setting": "non-memorized + DoRI (50 steps)", **row}],
                      "per_image": [  # one target DoRI left out, one control image it forced
                          {"caption": "a cat", "kind": "memorized", "cells": {"mine[v2] + DoRI (50 steps)": {
                              "replicated": 0, "generations": 4, "score_max": 0.46},
                              "non-memorized-v2 + DoRI (50 steps)": {
                                  "replicated": 0, "generations": 4, "score_max": 0.4}}},
                          {"caption": "a clock", "kind": "held_out", "cells": {"non-memorized + DoRI (50 steps)": {
                              "replicated": 1, "generations": 4, "score_max": 0.55}}}]},
           "manifest": {"seconds": 1.0, "attack_timing": {"n": 0}}}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: res)
    r = dori_cli("demo", "--out", str(tmp_path / "run[v1]"))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for text in ("mine[v2]+dori@50", "mine[v2] + DoRI", "MR vs steps, mine[v2]+dori memorized",
                 "mine[v2] + DoRI (50 steps), not brought back: a cat (0/4, best 0.46)",
                 "non-memorized + DoRI (50 steps), forced: a clock (1/4, best 0.55)",
                 "non-memorized-v2 + DoRI (50 steps), not brought back: a cat (0/4, best 0.40)"):
        assert text in out, text
    assert f"wrote {tmp_path / 'run[v1]' / 'results.json'} and" in r.stdout  # on one line, however long


def test_run_file_errors_are_one_line(tmp_path, dori_cli):
    f = tmp_path / "study.toml"
    f.write_text('out = "o"\nseed = [0]\n')
    r = dori_cli("run", str(f))
    assert r.returncode == 2 and "unknown key(s) ['seed']" in r.stderr and "seeds" in r.stderr


def test_import_nemo_writes_the_masks_and_says_how_to_attack_them(tmp_path, dori_cli):
    from dori.analyses.mitigate import attack_targets
    from dori.data.prompts import load_prompt_set

    caption = attack_targets(load_prompt_set("tiny"), 1)[0].caption
    (tmp_path / "stats.csv").write_text("Caption;URL;Initial Neurons;Initial SSIM;Refined Neurons;Refined SSIM\n"
                                        f"{caption};u;[[1, 2], [], [], [3]];0.3;[[2], [], [], [3]];0.2\n")
    r = dori_cli("import-nemo", str(tmp_path / "stats.csv"), "--out", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr
    assert "wrote 1 refined NeMo masks" in r.stdout and "2 neurons in all; 0 empty" in r.stdout
    assert f"--masks nemo-ref={tmp_path / 'ref'}" in r.stdout and len(list((tmp_path / "ref").glob("*.json"))) == 1
    r = dori_cli("import-nemo", str(tmp_path / "stats.csv"), "--out", str(tmp_path / "r2"), "--model", "tiny",
                 "--neurons", "initial")
    assert r.returncode == 0 and "3 neurons in all" in r.stdout, r.stderr
