import json

import pytest

from dori.analyses.demo import run_demo
from dori.reports.results import write_json

STAGES = ("generate", "detect", "wanda")  # NeMo is exercised in test_nemo_wanda.py and by CI's demo run
ROW_KEYS = {"stage", "setting", "budget", "caption", "kind", "seed", "image", "reference", "score", "replicated"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(out=out, seeds=(0,), stages=STAGES)
    return out, res


def test_demo_writes_rows_images_and_report(demo_run):
    out, res = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["samples"] == res["samples"]
    plain = [r for r in res["samples"] if r["setting"] == "none"]
    assert len(plain) == len(res["prompts"])  # one seed
    for row in res["samples"]:
        assert ROW_KEYS <= row.keys()
        assert (out / row["image"]).is_file()
        assert row["reference"] is None or (out / row["reference"]).is_file()
        assert row["budget"] == 0 and (row["stage"], row["setting"]) in {
            ("generate", "none"), ("mitigate", "wanda"), ("mitigate", "wanda-joint")}
    m = res["manifest"]
    assert {"config", "versions", "git", "seeds"} <= m.keys() and m["seeds"] == [0]
    assert res["aggregates"]["generate/none/memorized"]["n_images"] >= 8
    html = (out / "report.html").read_text()
    assert "generate/none/memorized" in html and "<img" in html
    assert (out / "plots" / "scores.png").is_file() and (out / "plots" / "roc.png").is_file()
    assert res["detection"]["auroc"] >= 0.95
    w = res["mitigations"]["wanda"]
    assert len(w["table"]) == 8 and all(t["mask_size"] > 0 for t in w["table"])
    assert len(list((out / "masks" / "wanda").glob("*.safetensors"))) == 9  # 8 prompts + joint


def test_demo_resumes_without_redoing_finished_captions(demo_run, tmp_path):
    out, res = demo_run
    items = sorted((out / "items").glob("*.json"))
    assert len(items) >= len(res["prompts"])
    # simulate a kill: lose the final results and two finished items, then run again
    (out / "results.json").unlink()
    for p in items[:2]:
        p.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in items[2:]}
    res2 = run_demo(out=out, seeds=(0,), stages=STAGES)
    assert {p.name: p.stat().st_mtime_ns for p in items[2:]} == before  # untouched
    assert res2["samples"] == res["samples"]  # redone items are bit-identical


def test_write_json_is_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}  # the old file survives a failed write
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]
