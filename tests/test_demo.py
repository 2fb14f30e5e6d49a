import json
import shutil

import pytest

from dori.analyses.demo import run_demo
from dori.analyses.runfile import load_run_file
from dori.reports.results import write_json

STAGES = ("generate", "detect", "wanda", "bypass")  # NeMo: test_nemo_wanda.py
# a short attack keeps the test fast; the paper's settings are measured by `dori attack` (see the docs)
ATTACK = dict(attack=dict(steps=3, pairs=2), budgets=(0, 1, 3), control_per_kind=1, max_targets=3)
ROW_KEYS = {"stage", "setting", "budget", "caption", "kind", "seed", "image", "reference", "score", "replicated"}


def assert_same_rows(got, want):
    """The same sample rows. A redone item is generated in another UNet batch than the first time, which
    on the CPU changes the order of float sums: its scores may move in the 7th digit, nothing else may."""
    assert len(got) == len(want)
    floats = ("score", "nearest_score")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        diff = {k for k in a.keys() | b.keys() if k not in floats and a.get(k) != b.get(k)}
        assert not diff, (i, {k: (a.get(k), b.get(k)) for k in diff})
        for k in floats:
            assert (a.get(k) is None) == (b.get(k) is None), (i, k)
            assert a.get(k) is None or a[k] == pytest.approx(b[k], abs=1e-5), (i, k, a[k], b[k])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run_demo(out=out, seeds=(0,), stages=STAGES, **ATTACK)
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
        assert (row["stage"], row["setting"]) in {
            ("generate", "none"), ("mitigate", "wanda"), ("mitigate", "wanda-joint"), ("bypass", "wanda+dori"),
            ("bypass", "wanda+random"), ("bypass", "none+dori"), ("bypass", "none+random"),
            ("bypass", "wanda+tokens"), ("bypass", "none+tokens")}
        assert row["budget"] == 0 or row["stage"] == "bypass"
    m = res["manifest"]
    assert {"config", "versions", "git", "seeds"} <= m.keys() and m["seeds"] == [0]
    assert res["aggregates"]["generate/none/memorized"]["n_images"] >= 8
    html = (out / "report.html").read_text()
    assert "generate/none/memorized" in html and "<img" in html
    assert (out / "plots" / "scores.png").is_file() and (out / "plots" / "roc.png").is_file()
    det = {d["name"]: d for d in res["detection"]}
    assert list(det) == ["noise-magnitude", "seed-consistency"]
    assert det["noise-magnitude"]["auroc"] >= 0.9 and det["seed-consistency"]["auroc"] >= 0.95, det
    assert det["seed-consistency"]["flagged_memorized"] == 1.0
    # max_targets=3: the first 3 memorized captions are mitigated (and attacked)
    w = res["mitigations"]["wanda"]
    assert len(w["table"]) == 3 and all(t["mask_size"] > 0 for t in w["table"])
    assert len(list((out / "masks" / "wanda").glob("*.safetensors"))) == 4  # 3 prompts + joint
    # the side effect is measured on the first 4 non-memorized captions of each kind (the demo's default)
    joint = [r for r in res["samples"] if r["setting"] == "wanda-joint"]
    kinds = {r["kind"] for r in res["prompts"] if r["kind"] != "memorized"}
    assert sorted(r["kind"] for r in joint) == sorted(k for k in kinds for _ in range(4))
    b = res["bypass"]
    labels = [r["setting"] for r in b["table"]]
    assert labels == ["memorized (no mitigation)", "wanda", "wanda + DoRI (3 steps)", "wanda + random (same norm)",
                      "wanda + word-perturbed prompts", "non-memorized", "non-memorized + DoRI (3 steps)",
                      "non-memorized + random (same norm)", "non-memorized + word-perturbed prompts"]
    tokens = [r for r in res["samples"] if r["setting"] == "wanda+tokens"]
    assert len(tokens) == 3 and all(r["budget"] == 0 and r["trigger_prompt"] for r in tokens)
    assert any(r["trigger_prompt"] != r["caption"] for r in tokens)
    # the attack time covers exactly this run's attacked targets: 3 memorized + 2 control
    assert res["manifest"]["attack_timing"]["n"] == 5
    dori_rows = [r for r in res["samples"] if r["setting"] == "wanda+dori"]
    assert sorted({r["budget"] for r in dori_rows}) == [0, 1, 3] and len(dori_rows) == 3 * 3
    control = {r["kind"] for r in res["samples"] if r["setting"] == "none+dori"}
    assert control == {"seen_once", "held_out"}
    # budget 0 is the original prompt's embedding: the mitigation stage's image, reused, not generated again
    mit = {r["caption"]: (r["score"], r["image"]) for r in res["samples"] if r["setting"] == "wanda"}
    assert all((r["score"], r["image"]) == mit[r["caption"]] for r in dori_rows if r["budget"] == 0)
    assert set(b["curves"]) == {"wanda+dori memorized", "none+dori non-memorized", "none+dori seen_once",
                                "none+dori held_out"}
    for kind in ("seen_once", "held_out"):  # the control per kind: the share of its generations that replicate
        rows = [r for r in res["samples"] if r["setting"] == "none+dori" and r["kind"] == kind]
        share = [sum(r["replicated"] for r in rows if r["budget"] == s) / sum(r["budget"] == s for r in rows)
                 for s in (0, 1, 3)]  # every photo has the same number of seeds: the same as MR
        assert b["curves"][f"none+dori {kind}"] == {"budget": [0, 1, 3], "mr": pytest.approx(share)}
    assert "Bypass benchmark" in html and (out / "plots" / "bypass_mr_vs_steps.png").is_file()
    assert len(list((out / "triggers" / "wanda").glob("*.safetensors"))) == 3


def test_demo_resumes_without_redoing_finished_captions(demo_run, tmp_path):
    src, res = demo_run
    out = tmp_path / "demo"  # a copy: the run below redoes items, and other tests compare with the original
    shutil.copytree(src, out)
    items = sorted((out / "items").glob("*.json"))
    assert len(items) >= len(res["prompts"])
    # simulate a kill: lose the final results and two finished items, then run again
    (out / "results.json").unlink()
    for p in items[:2]:
        p.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in items[2:]}
    res2 = run_demo(out=out, seeds=(0,), stages=STAGES, **ATTACK)
    assert {p.name: p.stat().st_mtime_ns for p in items[2:]} == before  # untouched
    assert_same_rows(res2["samples"], res["samples"])


def test_a_recorded_run_is_repeated_without_redoing_anything(demo_run, tmp_path):
    src, res = demo_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    args = load_run_file(out)  # the run.json written before the run started
    assert args["out"] == str(out) and args["seeds"] == [0] and args["attack"] == ATTACK["attack"]
    pinned = load_run_file(out / "results.json")  # the finished run, resolved settings pinned
    assert pinned["attack"]["lr"] == res["manifest"]["config"]["resolved_attack"]["lr"]
    assert pinned["num_inference_steps"] == res["manifest"]["config"]["resolved_generation"]["num_inference_steps"]
    items = {p.name: p.stat().st_mtime_ns for p in (out / "items").glob("*.json")}
    for a in (args, pinned):
        again = run_demo(**a, command="dori run")
        # the recorded arguments name the same work items: nothing is redone, every row is the same
        assert {p.name: p.stat().st_mtime_ns for p in (out / "items").glob("*.json")} == items
        assert again["samples"] == res["samples"] and again["bypass"]["table"] == res["bypass"]["table"]
    assert json.loads((out / "results.json").read_text())["manifest"]["command"] == "dori run"


def test_bypass_killed_midway_resumes_to_the_same_results(demo_run, monkeypatch):
    from dori.attacks.dori import DoRI

    out, res = demo_run
    full = json.loads((out / "results.json").read_text())
    # back to the state before the bypass stage: no triggers, no bypass items, no results.json
    shutil.rmtree(out / "triggers")
    for p in (out / "items").glob("*.json"):
        rows = json.loads(p.read_text())
        if isinstance(rows, list) and rows and rows[0].get("stage") == "bypass":
            p.unlink()
    (out / "results.json").unlink()
    real, calls = DoRI.attack, []

    def killed_on_third_call(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill, in the middle of the bypass stage
        return real(self, *a, **k)

    monkeypatch.setattr(DoRI, "attack", killed_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out=out, seeds=(0,), stages=STAGES, **ATTACK)
    assert not (out / "results.json").exists()
    assert len(list((out / "triggers").glob("*/*.safetensors"))) == 2  # two finished groups survive
    monkeypatch.setattr(DoRI, "attack", real)
    again = run_demo(out=out, seeds=(0,), stages=STAGES, **ATTACK)
    on_disk = json.loads((out / "results.json").read_text())
    for key in full:
        if key != "manifest":
            assert on_disk[key] == full[key], key
    assert again["bypass"]["table"] == res["bypass"]["table"]


def test_prompts_without_reference_images_are_generated_and_said_unscored(tmp_path, caplog):
    (tmp_path / "p.txt").write_text("a [red] car at night\n")  # a plain prompt list: no reference image
    res = run_demo(out=tmp_path / "run", prompt_set=tmp_path / "p.txt", stages=["generate"], seeds=(0,))
    assert [(s["caption"], s["score"]) for s in res["samples"]] == [("a [red] car at night", None)]
    assert (tmp_path / "run" / res["samples"][0]["image"]).is_file()
    assert res["plots"] == [] and not (tmp_path / "run" / "plots").exists()  # no empty histogram
    assert "none of the 1 generations was scored" in caplog.text


def test_write_json_is_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}  # the old file survives a failed write
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_an_sd_style_prompt_file_is_attacked_with_the_control_from_control_prompts(tmp_path):
    """The SD workflow on the tiny model: a NeMo prompt file of memorized (VM) captions with their images, and
    NeMo's unmemorized-file format (no type column) as the control. The VM target is reported as memorized,
    the control image (kind N) is attacked on the model as it is and serves the bypass only."""
    from dori.data.prompts import load_reference
    from dori.data.tiny import tiny_prompt_set
    from dori.reports.images import save_png

    tiny = tiny_prompt_set()
    target = next(r for r in tiny if r.memorized)
    held = next(r for r in tiny if r.kind == "held_out")
    save_png(load_reference(target), tmp_path / "mem" / "7.png")
    save_png(load_reference(held), tmp_path / "unmem" / "8.png")
    (tmp_path / "mem.csv").write_text(f"Caption;URL;type;Index\n{target.caption};u;VM;7\n")
    (tmp_path / "unmem.csv").write_text(f";Caption;URL;Index\n0;{held.caption};u;8\n")
    res = run_demo(out=tmp_path / "run", prompt_set=str(tmp_path / "mem.csv"), images_dir=str(tmp_path / "mem"),
                   control_prompts=str(tmp_path / "unmem.csv"), control_images_dir=str(tmp_path / "unmem"),
                   stages=["generate", "bypass"], seeds=(0,), attack=dict(steps=2, pairs=2), budgets=(0, 2),
                   token_variants=0)
    kinds = {(r["stage"], r["setting"], r["kind"]) for r in res["samples"]}
    assert ("bypass", "none+dori", "N") in kinds and ("bypass", "none+dori", "VM") in kinds
    assert not any(r["kind"] == "N" and r["stage"] != "bypass" for r in res["samples"])  # the bypass's only
    table = {t["setting"]: t for t in res["bypass"]["table"]}
    assert table["memorized (no mitigation)"]["mr"] == 1.0 and table["memorized + DoRI (2 steps)"]["n_images"] == 1
    assert table["non-memorized + DoRI (2 steps)"]["n_images"] == 1
    assert [p["kind"] for p in res["prompts"]] == ["VM", "N"]


def _sd_shaped_pipeline(folder):
    """A random pipeline of SD's kind (latent AutoencoderKL, CLIP text encoder, cross-attention UNet, DDIM),
    tiny widths, saved as `save_pretrained` writes SD: the code paths the tiny pixel-space model skips."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dori.models.loading import TINY_PATH

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(TINY_PATH / "tokenizer")
    StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                  num_hidden_layers=2, vocab_size=tok.vocab_size)),
        tokenizer=tok,
        unet=UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                  out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                  attention_head_dim=8, norm_num_groups=8),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),  # as SD v1.4's
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def test_the_bypass_runs_on_a_latent_sd_shaped_pipeline_with_sscd_and_nemos_files(tmp_path):
    """The SD workflow end to end, on random weights (nothing replicates; what is checked is that every stage
    runs and reports): NeMo's prompt files with reference images of other sizes, an SSCD TorchScript file, a
    latent VAE, classifier-free guidance, a mitigation that leaves no non-memorized caption to compare, and a
    fine-tune given as a pipeline folder with its UNet in half precision."""
    import numpy as np
    import torch
    from PIL import Image

    _sd_shaped_pipeline(tmp_path / "model")
    rng = np.random.default_rng(0)
    for folder, index in (("mem", 3), ("mem", 4), ("unmem", 10)):
        (tmp_path / folder).mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (30 + index, 40, 3), dtype=np.uint8)  # not the model's size nor square
        Image.fromarray(pixels).save(tmp_path / folder / f"{index}.jpg")
    (tmp_path / "mem.csv").write_text("Caption;URL;type;Index\nThe Colosseum at night;u;VM;3\nA car poster;u;TM;4\n")
    (tmp_path / "unmem.csv").write_text(";Caption;URL;Index\n0;Soaring by Peter Eades;u;10\n")

    class Descriptor(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)

    torch.jit.script(Descriptor()).save(str(tmp_path / "sscd.pt"))
    # a fine-tune of it, as a pipeline folder (its own text encoder) with the UNet saved in half precision
    import shutil

    from diffusers import UNet2DConditionModel

    shutil.copytree(tmp_path / "model", tmp_path / "ft", ignore=shutil.ignore_patterns("unet"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet")
    v = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight
    v.data[:4] += 0.25
    unet.half().save_pretrained(tmp_path / "ft" / "unet")
    res = run_demo(model=str(tmp_path / "model"), out=tmp_path / "run", prompt_set=str(tmp_path / "mem.csv"),
                   images_dir=str(tmp_path / "mem"), control_prompts=str(tmp_path / "unmem.csv"),
                   control_images_dir=str(tmp_path / "unmem"), metric="sscd-nemo", sscd_path=str(tmp_path / "sscd.pt"),
                   stages=["generate", "wanda", "bypass"], seeds=(0,), num_inference_steps=3, budgets=(0, 2),
                   attack=dict(pairs=2), token_variants=0, method_params={"wanda": {"sparsity": 0.05}},
                   finetuned={"ft": str(tmp_path / "ft")})
    assert res["mitigations"]["ft"]["summary"]["joint_mask_size"] == 4 * v.shape[1]  # what it changed, no more
    assert res["manifest"]["config"]["resolved_attack"]["steps"] == 2  # what ran, not DoRI's default 50
    assert res["manifest"]["config"]["resolved_generation"]["guidance_scale"] == 7.5  # SD's default
    table = [t["setting"] for t in res["bypass"]["table"]]
    assert table[0] == "memorized (no mitigation)" and "non-memorized" in table
    assert {"wanda", "wanda + DoRI (2 steps)", "ft", "ft + DoRI (2 steps)"} <= set(table)
    assert all((tmp_path / "run" / r["image"]).is_file() for r in res["samples"])
    assert {r["kind"] for r in res["samples"] if r["setting"] == "none+dori"} == {"N"}  # the control, attacked
    assert "not measured" in (tmp_path / "run" / "report.html").read_text()  # no non-memorized caption to compare
