"""Adversarial fine-tuning (dori.mitigations.adversarial_finetuning, `dori finetune`): fresh DoRI triggers per
epoch, a UNet folder the bypass benchmark audits with --finetuned, resumable after a kill."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import dori.mitigations.adversarial_finetuning as adv
from dori.analyses.finetune import keep_pairs, run_finetune
from dori.errors import DoriError
from dori.mitigations.finetuned import FineTunedUNet

SMALL = dict(max_targets=1, epochs=2, steps=2, batch=2, attack={"steps": 2, "pairs": 2})


@pytest.fixture
def small_keep(monkeypatch):
    """A few ordinary pairs instead of the tiny recipe's 6,691 (built in `test_the_tiny_models_own_pairs_...`)."""
    from dori.data.prompts import load_prompt_set, load_reference

    recs = [r for r in load_prompt_set("tiny") if r.kind == "seen_once" and r.reference_status == "ok"][:4]
    pairs = (torch.stack([load_reference(r) for r in recs]), [r.caption for r in recs])
    monkeypatch.setattr("dori.analyses.finetune.keep_pairs", lambda *a: pairs)


def test_a_killed_fine_tuning_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, small_keep,
                                                                              tiny_pipe):
    whole = run_finetune(tmp_path / "a", **SMALL)
    assert [e["epoch"] for e in whole["epochs"]] == [0, 1] and not (tmp_path / "a" / "checkpoints").exists()
    save = adv._save

    def save_then_die(folder, key, records, *a):
        save(folder, key, records, *a)
        raise KeyboardInterrupt("killed after the first epoch")

    monkeypatch.setattr(adv, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path / "b", **SMALL)
    assert not (tmp_path / "b" / "unet").exists() and (tmp_path / "b" / "checkpoints" / "last.json").is_file()
    monkeypatch.setattr(adv, "_save", save)
    resumed = run_finetune(tmp_path / "b", **SMALL)
    a, b = (load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [{**e, "seconds": 0} for e in resumed["epochs"]] == [{**e, "seconds": 0} for e in whole["epochs"]]

    # the result is a fine-tune the bypass benchmark takes; every weight moved, the model's own files did not
    patch = FineTunedUNet("adv", tmp_path / "a" / "unet").patch(tiny_pipe)
    assert len(patch) > 0.9 * sum(p.numel() for p in tiny_pipe.unet.parameters())
    # started again when finished: nothing is redone
    stamp = (tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert run_finetune(tmp_path / "a", **SMALL)["epochs"] == whole["epochs"]
    assert (tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(DoriError, match="holds a fine-tune made with other settings"):
        run_finetune(tmp_path / "a", **{**SMALL, "lr": 1e-3})
    record = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert record["manifest"]["config"]["epochs"] == 2 and len(record["surrogate"]) > 0
    assert [set(s) for s in record["surrogates"]] == [{"caption", "seed", "score", "replicates", "copies_among_seeds"}]
    assert len(list((tmp_path / "a" / "surrogates").glob("*.png"))) == 1


def test_the_tiny_models_own_pairs_keep_its_utility_and_hold_no_memorized_photo(tiny_pipe):
    from dori.data.tiny import spec_from_recipe

    images, captions = keep_pairs(tiny_pipe, [])
    memorized = set(spec_from_recipe(tiny_pipe.dori_recipe).memorized)
    assert len(images) == len(captions) > 6000 and images.shape[1:] == (3, 32, 32)
    from dori.zoo.tiny_data import PHOTO_CAPTIONS

    assert not {PHOTO_CAPTIONS[n] for n in memorized} & set(captions)


@pytest.mark.parametrize("args, message", [
    (dict(surrogate="esd"), "--surrogate takes wanda or nemo"),
    (dict(epochs=0), "epochs=0 is out of range"),
    (dict(max_targets=0), "max_targets must be 1 or more"),
    (dict(method_params={"wanda": {"spars": 0.1}}), "wanda has no parameter ['spars']"),
    (dict(prompt_set="PROMPTS"), "has no memorized prompt with its reference image"),
    (dict(batch=1), "batch=1 is out of range"),
    (dict(keep_images_dir="x"), "--keep-images-dir is the folder of --keep-prompts' images: give both"),
    (dict(keep_prompts="PROMPTS"), "no non-memorized caption with its image on disk"),
    (dict(model="FOLDER"), "give --keep-prompts FILE --keep-images-dir DIR"),
])
def test_bad_fine_tuning_input_is_one_clear_error_before_the_model_loads(tmp_path, monkeypatch, args, message):
    import dori.models.loading as loading

    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "sd").mkdir()  # a model folder that is not a tiny model of dori's recipe
    args = {k: {"PROMPTS": str(tmp_path / "p.txt"), "FOLDER": str(tmp_path / "sd")}.get(v, v) if isinstance(v, str)
            else v for k, v in args.items()}
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loaded")))
    with pytest.raises(DoriError, match=re.escape(message)):
        run_finetune(tmp_path / "o", **args)


def test_finetune_from_the_command_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from dori.cli import app

    calls = []
    fake = {"epochs": [{"epoch": 0, "dori_final_loss": 0.5, "loss_adv": 0.1, "loss_dm": 0.2, "seconds": 1.0}],
            "surrogates": [{"caption": "old coins", "seed": 2, "replicates": False, "copies_among_seeds": 2},
                           {"caption": "a cameraman", "seed": 0, "replicates": False, "copies_among_seeds": 1}],
            "unet": str(tmp_path / "unet"), "targets": ["x"], "keep_pairs": 3, "manifest": {"seconds": 2.0}}
    monkeypatch.setattr("dori.analyses.finetune.run_finetune", lambda out, **kw: calls.append(kw) or fake)
    r = CliRunner().invoke(app, ["finetune", "--out", str(tmp_path), "--targets", "2", "--epochs", "3",
                                 "--surrogate", "nemo", "-p", "nemo.theta=4"])
    assert r.exit_code == 0, r.output
    assert calls[0]["max_targets"] == 2 and calls[0]["epochs"] == 3 and calls[0]["surrogate"] == "nemo"
    assert calls[0]["method_params"] == {"nemo": {"theta": 4}}
    assert "epoch 0: DoRI's final loss 0.5000" in r.output and "--finetuned adversarial=" in r.output
    assert "where the first seeds drew a copy: old coins (seed 2)\n" in r.output  # the cameraman's seed 0 was none


def test_the_surrogate_is_the_first_generation_that_is_no_copy(tiny_pipe, tmp_path, caplog):
    """Steering a memorized image to a copy of itself would keep it: a seed whose generation replicates is
    passed over; when every seed does, the lowest scoring one is taken, with a warning."""
    from dori.analyses.finetune import SURROGATE_SEEDS, pick_surrogate
    from dori.analyses.mitigate import attack_targets
    from dori.data.prompts import load_prompt_set
    from dori.metrics.base import ReplicationMetric
    from dori.mitigations.masks import Mask

    class Scripted(ReplicationMetric):  # seeds 3 and 4 copy, seed 5 does not
        def score(self, generated, reference):
            if len(generated) == 1:
                return torch.tensor([0.2])
            return torch.tensor([0.9, 0.8, 0.7] + [0.2] * (SURROGATE_SEEDS - 3))

    rec = attack_targets(load_prompt_set("tiny"), 1)[0]
    got = pick_surrogate(tiny_pipe, Mask("neuron", {}), rec, Scripted(), 3, tmp_path / "s.png")
    assert got["seed"] == 6 and not got["replicates"] and got["copies_among_seeds"] == 3
    assert {k: v for k, v in json.loads((tmp_path / "s.json").read_text()).items() if k != "key"} == got
    assert pick_surrogate(tiny_pipe, Mask("neuron", {}), rec, Scripted(), 3, tmp_path / "s.png") == got  # reused
    class Later(Scripted):  # picked again under another key (model, mask, metric or seeds)
        def score(self, generated, reference):
            return torch.tensor([0.2]) if len(generated) == 1 else torch.tensor([0.1] * SURROGATE_SEEDS)

    again = pick_surrogate(tiny_pipe, Mask("neuron", {}), rec, Later(), 3, tmp_path / "s.png", {"model": "other"})
    assert again["seed"] == 3 and again["copies_among_seeds"] == 0

    from dori.analyses.demo import make_metric

    with caplog.at_level("WARNING"):  # no pruning at all: the model draws its memorized photo in every seed
        got = pick_surrogate(tiny_pipe, Mask("neuron", {}), rec, make_metric(None, tiny_pipe), 0, tmp_path / "c.png")
    assert got["replicates"] and got["copies_among_seeds"] == SURROGATE_SEEDS
    assert "is a copy, and the fine-tuning will keep it" in caplog.text


def test_each_epoch_attacks_the_current_weights_with_seeds_no_audit_uses_and_the_prompt_leaves_its_image(
        tiny_pipe, tmp_path, caplog):
    """DoRI runs on frozen, current weights (they differ between epochs), with training seeds an audit's small
    --attack-seed never repeats; the prompt's loss towards its surrogate falls; a checkpoint of other settings
    is not resumed."""
    from dori.analyses.mitigate import attack_targets
    from dori.attacks.dori import DoRI
    from dori.data.prompts import load_prompt_set, load_reference
    from dori.models.generate import denoising_loss, encode_prompts
    from dori.reports.results import tensor_digest

    rec = attack_targets(load_prompt_set("tiny"), 1)[0]
    target = load_reference(rec)[None]
    surrogate = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keep = [r for r in load_prompt_set("tiny") if r.kind == "seen_once" and r.reference_status == "ok"][:4]
    keep_x = torch.stack([load_reference(r) for r in keep])
    seen = []

    class Spy(DoRI):
        def attack(self, pipe, images, **kw):
            seen.append((any(p.requires_grad for p in pipe.unet.parameters()), kw["seed"],
                         tensor_digest(next(iter(pipe.unet.parameters())))))
            return super().attack(pipe, images, **kw)

    g = torch.Generator().manual_seed(1)
    noise, t = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 1000, (32,), generator=g)
    y = encode_prompts(tiny_pipe, [rec.caption]).expand(32, -1, -1)

    def loss() -> float:
        with torch.no_grad():
            return float(denoising_loss(tiny_pipe, (surrogate * 2 - 1).expand(32, -1, -1, -1), noise, t, y).mean())

    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    before = loss()
    try:
        loop = adv.AdversarialFineTuning(epochs=2, steps=10, lr=1e-3, batch=4)
        loop.run(tiny_pipe, target, [rec.caption], surrogate, keep_x, [r.caption for r in keep],
                 Spy(steps=2, pairs=2), checkpoints=tmp_path / "ck", key={"run": 1})
        after = loss()
        seen_first = list(seen)
        with caplog.at_level("WARNING"):  # another run's checkpoint: started again from the weights as they are
            loop.run(tiny_pipe, target, [rec.caption], surrogate, keep_x, [r.caption for r in keep],
                     Spy(steps=2, pairs=2), checkpoints=tmp_path / "ck", key={"run": 2})
    finally:
        with torch.no_grad():
            for n, p in tiny_pipe.unet.named_parameters():
                p.copy_(base[n])
                p.requires_grad_(False)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())  # run() leaves no gradient behind
    assert [s[0] for s in seen_first] == [False, False] and seen_first[0][2] != seen_first[1][2]
    assert [s[1] for s in seen_first] == [adv.TRAINING_ATTACK_SEEDS, adv.TRAINING_ATTACK_SEEDS + 1]
    assert after < 0.9 * before
    assert "made with other settings" in caplog.text and len(seen) == 4  # both epochs run again
