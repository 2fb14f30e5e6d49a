import re

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
        ('out = "o"\nseeds = "0,1"', "seeds must be a list of ints"),
        ('out = "o"\n[attack]\nstep = 10', "attack must be a table with keys among"),
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
