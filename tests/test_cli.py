import subprocess
import sys

from typer.testing import CliRunner

from dori.cli import app


def test_ls_lists_registries():
    r = CliRunner().invoke(app, ["ls"])
    assert r.exit_code == 0
    for name in ("tiny", "pixel-ssim", "sscd-nemo", "sscd-wen", "nemo-value"):
        assert name in r.output


def _dori(*args):
    return subprocess.run([sys.executable, "-c", "from dori.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_bad_input_is_one_clear_error_and_exit_2(tmp_path):
    r = _dori("demo", "--out", str(tmp_path / "o"), "--prompts", "tinny")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Did you mean 'tiny'" in r.stderr
    assert "Traceback" not in r.stderr
    r = _dori("demo", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_mitigation_parameters_from_the_command_line(tmp_path):
    from dori.cli import _method_params

    assert _method_params(["wanda.sparsity=0.1", "wanda.layer_group=value", "nemo.seed=3"]) == {
        "wanda": {"sparsity": 0.1, "layer_group": "value"}, "nemo": {"seed": 3}}
    r = _dori("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", "sparsity=0.1")
    assert r.returncode == 2 and "METHOD.KEY=VALUE" in r.stderr and "Traceback" not in r.stderr
    r = _dori("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", "wanda.sparsty=0.1")
    assert r.returncode == 2 and "wanda has no parameter ['sparsty']" in r.stderr and "sparsity" in r.stderr
    r = _dori("attack", "--out", str(tmp_path / "o"), "--mitigation", "wanda", "--param", "nemo.threshold=0.3")
    assert r.returncode == 2 and "parameters given for nemo, which this run does not use" in r.stderr
    for bad in ("wanda.sparsity=2", "wanda.layer_group=valu"):
        r = _dori("mitigate", "--method", "wanda", "--out", str(tmp_path / "o"), "--param", bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "bad parameter value" in r.stderr or "Did you mean 'value'" in r.stderr
    assert not (tmp_path / "o" / "items").exists()  # every error came before the first stage
