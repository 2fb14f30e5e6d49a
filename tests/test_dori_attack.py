import json

import torch
from safetensors.torch import load_file

from dori.attacks.dori import DoRI
from dori.data.prompts import load_reference
from dori.data.tiny import tiny_prompt_set
from dori.reports.images import slug


@torch.no_grad()
def _fixed_loss(pipe, img, embeds, n=64):
    from dori.models.generate import predict_noise, training_target

    g = torch.Generator().manual_seed(123)
    eps = torch.randn((n, *img.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    x0 = (img * 2 - 1).expand(n, -1, -1, -1)
    z, target = pipe.scheduler.add_noise(x0, eps, t), training_target(pipe.scheduler, x0, eps, t)
    return torch.stack([(predict_noise(pipe, z, t, e[None].expand(n, -1, -1)) - target).pow(2).mean() for e in embeds])


def test_dori_loss_falls_and_only_the_embedding_changes(tiny_pipe, weights_hash):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    img = load_reference(rec)[None]
    before = weights_hash(tiny_pipe.unet)
    res = DoRI(steps=12, lr=0.05, init="random", restarts=2).attack(tiny_pipe, img)
    assert res.trigger.shape == (2, 77, 64) and res.target_index == [0, 0]
    # the denoising loss on one fixed set of 64 (noise, timestep) pairs: lower for the trigger than the start
    assert (_fixed_loss(tiny_pipe, img, res.trigger) < _fixed_loss(tiny_pipe, img, res.init)).all()
    assert res.distance[-1][0] > 0 and len(res.loss) == 12
    assert weights_hash(tiny_pipe.unet) == before
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_dori_positions_limit_which_tokens_move(tiny_pipe):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    res = DoRI(steps=3, positions=[10, 11, 12]).attack(tiny_pipe, load_reference(rec)[None], prompts=[rec.caption])
    moved = (res.trigger - res.init).abs().amax(dim=(0, 2))
    assert moved[[10, 11, 12]].min() > 0
    assert moved[:10].max() == 0 and moved[13:].max() == 0


def test_snapshots_keep_the_trigger_at_each_budget(tiny_pipe):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    img = load_reference(rec)[None]
    res = DoRI(steps=4, pairs=2).attack(tiny_pipe, img, prompts=[rec.caption], snapshots=(0, 2, 4))
    assert sorted(res.snapshots) == [0, 2, 4]
    assert torch.equal(res.at(0), res.init) and torch.equal(res.at(4), res.trigger)
    assert not torch.equal(res.at(2), res.at(4))
    d2 = (res.at(2) - res.init).flatten(1).norm(dim=1).item()
    assert abs(d2 - res.distance[1][0]) < 1e-4  # the trace's step-2 distance is the snapshot's
    short = DoRI(steps=2, pairs=2).attack(tiny_pipe, img, prompts=[rec.caption])
    assert torch.equal(short.trigger, res.at(2))  # a 2-step run is the 4-step run's snapshot at 2


def test_early_stop_freezes_passing_triggers(tiny_pipe):
    rec = next(r for r in tiny_prompt_set() if r.kind == "memorized")
    img = load_reference(rec)[None]
    calls = []

    def check(y, idx):  # restart 0 passes at the first check, restart 1 never
        calls.append(y.clone())
        return torch.tensor([True, False])

    res = DoRI(steps=6, pairs=2, restarts=2, check_every=2).attack(tiny_pipe, img, prompts=[rec.caption], check=check)
    assert res.stopped_at == [2, None] and res.steps == 6 and len(calls) == 3
    assert torch.equal(res.trigger[0], calls[0][0])  # frozen from step 2 on
    assert not torch.equal(res.trigger[1], calls[0][1])


def test_baselines_share_the_interface(tiny_pipe):
    from dori.attacks.baselines import RandomPerturbation, TokenPerturbation, UnchangedPrompt
    from dori.models.generate import encode_prompts

    caps = [r.caption for r in tiny_prompt_set() if r.kind == "memorized"][:2]
    y0 = encode_prompts(tiny_pipe, caps)
    assert torch.equal(UnchangedPrompt().attack(tiny_pipe, None, caps).trigger, y0)
    rp = RandomPerturbation(samples=2).attack(tiny_pipe, None, caps, norms=[3.0, 5.0], seed=1)
    got = (rp.trigger - rp.init).flatten(1).norm(dim=1)
    assert torch.allclose(got, torch.tensor([3.0, 3.0, 5.0, 5.0]), atol=1e-4) and rp.target_index == [0, 0, 1, 1]
    tp = TokenPerturbation(variants=3, p=0.3)
    a, b = tp.attack(tiny_pipe, None, caps, seed=0), tp.attack(tiny_pipe, None, caps, seed=0)
    assert a.params["prompts"] == b.params["prompts"] and len(a.params["prompts"]) == 6
    assert any(p not in caps for p in a.params["prompts"])
    assert a.trigger.shape == (6, 77, 64)


def test_dori_brings_back_a_wanda_pruned_image_but_not_a_photo_it_never_memorized(tiny_pipe):
    """The paper's finding on the tiny model, with its shipped Wanda setting (a real run, 2 seeds)."""
    from dori.analyses.demo import make_attack, make_method
    from dori.metrics.pixel import PixelSSIM
    from dori.mitigations.masks import apply_mask
    from dori.models.generate import generate

    recs = {r.reference: r for r in tiny_prompt_set() if r.reference}
    # a colour photo (pixel-ssim lets DoRI force the coarse layout of smooth grayscale photos, even held-out
    # ones: docs/attacks.md) that Wanda + DoRI brings back in the full run: on the shipped weights the pagoda,
    # the cameraman and the coins do, the other five stay below the threshold in 50 steps
    target, control = recs["tiny:photo/china"], recs["tiny:photo/flower"]
    metric, seeds = PixelSSIM(), [0, 1]
    attack = make_attack(tiny_pipe, {"steps": 50, "pairs": 4})

    def scores(rec, embeds=None):
        kw = {"prompt_embeds": embeds} if embeds is not None else {"prompts": [rec.caption]}
        return metric.score(generate(tiny_pipe, seeds=seeds, **kw).images, load_reference(rec))

    assert (scores(target) > metric.threshold).all()  # memorized
    mask = make_method("wanda", tiny_pipe, None).localize(tiny_pipe, target.caption)
    with apply_mask(tiny_pipe, mask):
        assert (scores(target) < metric.threshold).all()  # mitigated: the prompt no longer replicates
        trigger = attack.attack(tiny_pipe, load_reference(target)[None], prompts=[target.caption]).trigger
        assert (scores(target, trigger) > metric.threshold).all()  # retained: DoRI brings it back
    trigger = attack.attack(tiny_pipe, load_reference(control)[None], prompts=[control.caption]).trigger
    assert (scores(control, trigger) < metric.threshold).all()  # the same attack cannot force a held-out photo


def test_bypass_table_curves_split_the_control_by_kind():
    from dori.analyses.bypass import bypass_table

    def row(setting, kind, caption, budget, seed, replicated):
        return {"stage": "bypass", "setting": setting, "kind": kind, "caption": caption, "budget": budget,
                "seed": seed, "replicated": replicated, "score": 0.9 if replicated else 0.1}

    rows = [row("wanda+dori", "memorized", "m", b, s, b > 0) for b in (0, 5) for s in (0, 1)]
    # at 5 steps: one seen-once photo forced in 1 of 2 seeds, the held-out photo in both
    rows += [row("none+dori", "seen_once", c, b, s, (b, c, s) == (5, "a", 0)) for c in "ab" for b in (0, 5)
             for s in (0, 1)]
    rows += [row("none+dori", "held_out", "h", b, s, b == 5) for b in (0, 5) for s in (0, 1)]
    curves = bypass_table(rows, [0, 5])["curves"]
    assert curves["wanda+dori memorized"]["mr"] == [0.0, 1.0]
    assert curves["none+dori seen_once"] == {"budget": [0, 5], "mr": [0.0, 0.25]}
    assert curves["none+dori held_out"] == {"budget": [0, 5], "mr": [0.0, 1.0]}
    assert curves["none+dori non-memorized"]["mr"] == [0.0, 0.5]  # (0.5 + 0 + 1) / 3 photos
    one_kind = [r for r in rows if r["kind"] != "held_out"]  # a single kind: no per-kind curve repeats it
    assert "none+dori seen_once" not in bypass_table(one_kind, [0, 5])["curves"]
    # SD's prompt sets: NeMo's VM/TM targets are memorized, its unmemorized LAION images (N) the control
    sd = [{**r, "kind": {"m": "VM" if r["seed"] else "TM"}.get(r["caption"], "N")} for r in one_kind]
    table = {t["setting"]: t for t in bypass_table(sd, [0, 5])["table"]}
    assert table["wanda + DoRI (5 steps)"]["mr"] == 1.0 and table["wanda"]["mr"] == 0.0
    assert table["non-memorized + DoRI (5 steps)"]["n_images"] == 2  # the two N photos, not the targets
    assert set(bypass_table(sd, [0, 5])["curves"]) == {"wanda+dori memorized", "none+dori non-memorized"}
    # which images come back, per image: generations that replicate of those generated, best score
    per_image = {i["caption"]: i for i in bypass_table(rows, [0, 5])["per_image"]}
    assert list(per_image) == ["m", "a", "b", "h"]  # the targets first, then the control, as the table
    assert per_image["m"]["cells"]["wanda"] == {"replicated": 0, "generations": 2, "score_max": 0.1}
    assert per_image["m"]["cells"]["wanda + DoRI (5 steps)"] == {"replicated": 2, "generations": 2, "score_max": 0.9}
    assert per_image["a"]["cells"]["non-memorized + DoRI (5 steps)"]["replicated"] == 1
    assert per_image["b"]["cells"]["non-memorized + DoRI (5 steps)"] == {"replicated": 0, "generations": 2,
                                                                         "score_max": 0.1}
    plain = [{**row("none", "memorized", c, 0, s, True), "stage": "generate"} for c in "mu" for s in (0, 1)]
    first = bypass_table(plain + rows, [0, 5])["table"][0]  # the attacked target only, not the unattacked "u"
    assert (first["setting"], first["n_images"], first["n_samples"]) == ("memorized (no mitigation)", 1, 2)
    both = rows + [row("none+dori", "N", "m", b, s, False) for b in (0, 5) for s in (0, 1)]  # also a control photo
    sides = [(i["caption"], i["kind"], sorted(i["cells"])) for i in bypass_table(both, [0, 5])["per_image"]]
    assert sides[0] == ("m", "memorized", ["wanda", "wanda + DoRI (5 steps)"])
    assert ("m", "N", ["non-memorized", "non-memorized + DoRI (5 steps)"]) in sides


def test_bypass_attack_seed_changes_the_triggers_and_is_recorded(tiny_pipe, tmp_path):
    """`dori attack --attack-seed`: another seed draws other (noise, timestep) pairs, so other triggers."""
    from dori.analyses.bypass import run_bypass
    from dori.analyses.demo import make_attack
    from dori.metrics.pixel import PixelSSIM

    rec = next(r for r in tiny_prompt_set() if r.memorized and r.reference)
    attack = make_attack(tiny_pipe, {"steps": 2, "pairs": 2})
    triggers = {}
    for seed in (0, 1):
        run_bypass(tiny_pipe, [rec], {"none": None}, PixelSSIM(), tmp_path / str(seed), attack=attack, budgets=[0, 2],
                   seeds=[0], random_baseline=False, seed=seed)
        meta = json.loads(next((tmp_path / str(seed) / "triggers" / "none").glob("*.json")).read_text())
        assert meta["params"]["seed"] == seed
        triggers[seed] = load_file(str(next((tmp_path / str(seed) / "triggers" / "none").glob("*.safetensors"))))
    assert torch.equal(triggers[0]["budget_0"], triggers[1]["budget_0"])  # both start from the caption
    assert not torch.equal(triggers[0]["budget_2"], triggers[1]["budget_2"])


def test_bypass_early_stop_freezes_triggers_that_already_replicate(tiny_pipe, tmp_path):
    """`dori attack --early-stop`: on the unmitigated model a memorized caption's trigger replicates at the
    first check, so it is frozen there and stands for the later budget; a held-out photo's never passes,
    and without early stop the trigger moves on."""
    from dori.analyses.bypass import run_bypass
    from dori.analyses.demo import make_attack
    from dori.metrics.pixel import PixelSSIM

    recs = tiny_prompt_set()
    rec = next(r for r in recs if r.memorized and r.reference)
    held = next(r for r in recs if r.kind == "held_out" and r.reference)
    attack = make_attack(tiny_pipe, {"pairs": 2, "check_every": 2})
    got = {}
    for early in (False, True):
        out = tmp_path / str(early)
        rows = run_bypass(tiny_pipe, [rec], {"none": None}, PixelSSIM(), out, attack=attack, budgets=[0, 2, 4],
                          seeds=[0], random_baseline=False, early_stop=early, control=[held])
        metas = [json.loads(p.read_text()) for p in (out / "triggers" / "none").glob("*.json")]
        metas = {m["caption"]: m for m in metas}
        t = load_file(str(out / "triggers" / "none" / f"{slug(rec.caption)}.safetensors"))
        got[early] = metas, t, {r["budget"]: r["score"] for r in rows if r["caption"] == rec.caption}
    metas, t, scores = got[True]
    meta = metas[rec.caption]
    assert meta["stopped_at"] == 2 and meta["params"]["early_stop"]["check_every"] == 2
    assert meta["params"]["early_stop"]["seed"] == 1  # a sampling seed the benchmark does not evaluate
    assert len(meta["loss"]) == 2  # its group had one target: the loop ended when it froze
    assert torch.equal(t["budget_4"], t["budget_2"]) and scores[4] == scores[2]
    assert metas[held.caption]["stopped_at"] is None and len(metas[held.caption]["loss"]) == 4
    metas, t, _ = got[False]
    assert metas[rec.caption]["stopped_at"] is None and "early_stop" not in metas[rec.caption]["params"]
    assert not torch.equal(t["budget_4"], t["budget_2"])


def test_bypass_triggers_are_keyed_by_their_target_images(tiny_pipe, tmp_path):
    """A run started again with other reference images (another --images-dir) attacks those, never reusing
    triggers optimized towards the old ones."""
    from dataclasses import replace

    from dori.analyses.bypass import run_bypass
    from dori.analyses.demo import make_attack
    from dori.metrics.pixel import PixelSSIM
    from dori.reports.images import save_png

    rec = next(r for r in tiny_prompt_set() if r.memorized and r.reference)
    save_png(load_reference(rec).flip(-1), tmp_path / "mirrored.png")
    attack = make_attack(tiny_pipe, {"steps": 2, "pairs": 2})
    triggers, targets = [], []
    for r in (rec, replace(rec, reference=str(tmp_path / "mirrored.png")), rec):
        run_bypass(tiny_pipe, [r], {"none": None}, PixelSSIM(), tmp_path / "run", attack=attack, budgets=[0, 2],
                   seeds=[0], random_baseline=False)
        base = tmp_path / "run" / "triggers" / "none" / slug(rec.caption)
        targets.append(json.loads(base.with_suffix(".json").read_text())["params"]["targets"])
        triggers.append(load_file(str(base.with_suffix(".safetensors")))["budget_2"])
    assert len(targets[1]) == 1 and targets[0] != targets[1] and not torch.equal(triggers[0], triggers[1])
    assert targets[2] == targets[0] and torch.equal(triggers[2], triggers[0])  # back to the first: the same steps


def test_attack_targets_are_the_references_at_the_models_resolution(tiny_pipe, tmp_path):
    """SD's reference images come in any size (LAION): the attack gets each as a centre square at the model's
    resolution; the tiny model's 32 x 32 photos are used as they are."""
    from dataclasses import replace

    import torch.nn.functional as F

    from dori.analyses.bypass import target_images
    from dori.reports.images import save_png

    rec = next(r for r in tiny_prompt_set() if r.memorized and r.reference)
    ramp = torch.linspace(0, 1, 96).expand(3, 64, 96).clone()  # a horizontal ramp: the resampling shows
    for name, w, h in (("small.png", 20, 10), ("large.png", 96, 64)):
        save_png(F.interpolate(ramp[None], size=(h, w), mode="area")[0], tmp_path / name)
    recs = [rec, *(replace(rec, reference=str(tmp_path / name)) for name in ("small.png", "large.png"))]
    images = target_images(tiny_pipe, [load_reference(r) for r in recs])
    assert images.shape == (3, 3, 32, 32) and torch.equal(images[0], load_reference(rec))
    small, large = (load_reference(r) for r in recs[1:])  # as read back (8-bit)
    centre = small[..., :, 5:15][None]  # the 10 x 10 centre square of 20 x 10
    assert torch.allclose(images[1], F.interpolate(centre, size=(32, 32), mode="bicubic")[0].clamp(0, 1))
    assert torch.allclose(images[2], F.interpolate(large[..., :, 16:80][None], size=(32, 32), mode="area")[0])
