import logging

import pytest
import torch

from dori import load_prompt_set
from dori.data.tiny import tiny_stats_prompts
from dori.mitigations.masks import Mask, apply_mask
from dori.mitigations.nemo import NeMo, _ssim
from dori.mitigations.wanda import Wanda
from dori.models.generate import encode_prompts
from dori.models.layers import resolve_layers

MEMORIZED = "chelsea the orange tabby cat looking up"
# the memorized caption whose search on SD's value group is shortest (69 UNet calls to the cat's 187)
SHORT_SEARCH = "a red motorcycle parked in a workshop"


@pytest.fixture(scope="module")
def nemo_kwargs(tiny_pipe, tmp_path_factory):
    kw = dict(tiny_pipe.dori_method_defaults.get("nemo", {}))
    kw["stats_cache"] = tmp_path_factory.mktemp("cache")
    return kw


def test_statistics_are_cached_and_reloaded(tiny_pipe, nemo_kwargs):
    a = NeMo(**nemo_kwargs)
    stats = a.fit_statistics(tiny_pipe, tiny_stats_prompts()[:50])
    b = NeMo(**nemo_kwargs)
    again = b.fit_statistics(tiny_pipe, tiny_stats_prompts()[:50])
    assert list(stats) == [r.name for r in resolve_layers(tiny_pipe.unet, a.layer_group)]
    for n in stats:
        assert torch.equal(stats[n][0], again[n][0]) and torch.equal(stats[n][1], again[n][1])
    assert len(list((nemo_kwargs["stats_cache"] / "nemo_stats").glob("*.safetensors"))) == 1


def test_a_statistics_cache_that_cannot_be_written_is_a_warning(tiny_pipe, tmp_path, caplog):
    (tmp_path / "cache").write_text("")  # a file where the cache folder should be: mkdir fails
    nemo = NeMo(**tiny_pipe.dori_method_defaults.get("nemo", {}), stats_cache=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="dori.mitigations.nemo"):
        stats = nemo.fit_statistics(tiny_pipe, tiny_stats_prompts()[:8])
    assert len(stats) == len(resolve_layers(tiny_pipe.unet, nemo.layer_group))
    assert "could not write NeMo's statistics to dori's cache" in caplog.text and "DORI_CACHE" in caplog.text


def test_batched_nemo_selects_exactly_what_the_sequential_procedure_selects(tiny_pipe, nemo_kwargs, caplog):
    stats = tiny_stats_prompts()
    kw = nemo_kwargs | {"layer_group": "nemo-value"}  # SD's group: 4 layers here, cheaper than the shipped 10
    with caplog.at_level(logging.WARNING, logger="dori.mitigations.nemo"):
        # the reference procedure: one full UNet call per candidate check
        seq = NeMo(**kw, batch_candidates=1, reuse_prefix=False).localize(tiny_pipe, SHORT_SEARCH, stats)
    # NeMo warns exactly when even the whole layer group deactivated stays above its threshold
    warned = any("almost surely out of reach" in r.getMessage() for r in caplog.records)
    assert warned == (not seq.stats["threshold_reachable"])
    assert seq.stats["threshold_reachable"] == (seq.stats["signal_floor"] <= NeMo(**kw).threshold)
    assert seq.stats["replayed_units"] == 0
    # dori's default (one check per call, prefix replay) and batched checks with replay (4 per call
    # here): exact on the CPU, where float results do not depend on the batch (on CUDA: tests/test_gpu.py)
    for batch in (1, 4):
        run = NeMo(**kw, batch_candidates=batch, reuse_prefix=True).localize(tiny_pipe, SHORT_SEARCH, stats)
        assert seq.memorized and run.memorized
        assert seq.mask.counts() == run.mask.counts()
        assert all(torch.equal(seq.mask.layers[n], run.mask.layers[n]) for n in seq.mask.layers)
        assert seq.initial == run.initial
        for key in ("signal_floor", "initial_signal", "final_signal"):
            assert seq.stats[key] == pytest.approx(run.stats[key], abs=1e-5)
        assert run.stats["replayed_units"] > 0
        assert (run.stats["speculative"] > 0) == (batch > 1)  # a batch checked past a hit, and redone
    bat = run
    assert bat.stats["unet_calls"] < seq.stats["unet_calls"]
    assert 0 < len(bat.mask) <= bat.stats["n_initial"]


def test_nemo_with_the_shipped_settings_stops_a_memorized_image(tiny_pipe, nemo_kwargs):
    """docs/tiny-model.md: NeMo fully stops 6 of 8 memorized images of the tiny model; the cat is one."""
    from dori.data.prompts import load_reference
    from dori.metrics.pixel import PixelSSIM
    from dori.models.generate import generate

    rec = next(r for r in load_prompt_set("tiny") if r.caption == MEMORIZED)
    metric, seeds = PixelSSIM(), [0, 1, 2, 3]

    def mr() -> float:
        scores = metric.score(generate(tiny_pipe, [MEMORIZED], seeds=seeds).images, load_reference(rec))
        return float((scores > metric.threshold).float().mean())

    res = NeMo(**nemo_kwargs).localize(tiny_pipe, MEMORIZED, tiny_stats_prompts())
    before = mr()
    with apply_mask(tiny_pipe, res.mask):
        after = mr()
    assert res.stats["threshold_reachable"] and before >= 0.75 and after <= 0.25, (before, after)


def test_signal_floor_is_the_signal_with_every_neuron_deactivated(tiny_pipe, nemo_kwargs):
    nemo = NeMo(**nemo_kwargs)
    e = encode_prompts(tiny_pipe, [MEMORIZED])
    vanilla = nemo.noise_diffs(tiny_pipe, e, nemo.seeds)[0]
    floor = nemo.signal_floor(tiny_pipe, e, vanilla, nemo.seeds)
    # the same through the other path: a neuron Mask applied with forward hooks
    layers = resolve_layers(tiny_pipe.unet, nemo.layer_group)
    everything = Mask("neuron", {r.name: torch.arange(r.module.out_features) for r in layers})
    with apply_mask(tiny_pipe, everything):
        blocked = nemo.noise_diffs(tiny_pipe, e, nemo.seeds)[0]
    assert floor == pytest.approx(float(_ssim(vanilla, blocked).max()), abs=1e-5)
    assert 0 < floor <= nemo.threshold  # the shipped setting can be reached (docs/tiny-model.md: 0.27-0.50)


def test_non_memorized_prompt_gets_no_neurons(tiny_pipe, nemo_kwargs):
    res = NeMo(**nemo_kwargs).localize(tiny_pipe, "close up of a grey brick wall", tiny_stats_prompts())
    assert not res.memorized and len(res.mask) == 0


def test_wanda_selects_at_most_sparsity_per_row_per_step_and_changes_output(tiny_pipe):
    w = Wanda(sparsity=0.05, n_steps=3)
    mask = w.localize(tiny_pipe, MEMORIZED)
    layers = {r.name: r.module for r in resolve_layers(tiny_pipe.unet, "ffn-out")}
    assert set(mask.layers) == set(layers)
    for name, idx in mask.layers.items():
        out_f, in_f = layers[name].weight.shape
        per_row = torch.bincount(idx // in_f, minlength=out_f)
        assert per_row.max() <= 3 * max(1, round(0.05 * in_f))
    assert len(mask) > 0
    assert mask.meta["method"] == "wanda" and mask.meta["prompt"] == MEMORIZED
    from dori.models.generate import generate

    base = generate(tiny_pipe, [MEMORIZED], seeds=[0], num_inference_steps=3).images
    with apply_mask(tiny_pipe, mask):
        pruned = generate(tiny_pipe, [MEMORIZED], seeds=[0], num_inference_steps=3).images
    assert (pruned - base).abs().max() > 1e-3


def test_memorized_prompts_exist_in_tiny_set():
    assert MEMORIZED in {r.caption for r in load_prompt_set("tiny") if r.memorized}


def test_a_changed_parameter_never_reuses_the_old_masks_or_images(tiny_pipe, tmp_path):
    from dori.analyses.mitigate import run_mitigation
    from dori.analyses.replication import evaluate_replication
    from dori.metrics.pixel import PixelSSIM

    recs = load_prompt_set("tiny")
    sub = [r for r in recs if r.memorized][:2] + [r for r in recs if r.kind == "seen_once"][:2]
    gen, metric = {"num_inference_steps": 5}, PixelSSIM()
    base = evaluate_replication(tiny_pipe, sub, [0], metric, tmp_path, gen_kwargs=gen)

    def run(sparsity):
        return run_mitigation(tiny_pipe, Wanda(sparsity=sparsity, n_steps=2), sub, [0], metric, tmp_path, gen, base)

    a, b = run(0.01), run(0.3)
    cap = sub[0].caption
    assert b["masks"][cap].meta["params"]["sparsity"] == 0.3 and len(b["masks"][cap]) > len(a["masks"][cap])
    assert {r["image"] for r in a["samples"]}.isdisjoint(r["image"] for r in b["samples"])
    assert [r["score"] for r in a["samples"]] != [r["score"] for r in b["samples"]]
    again = run(0.01)  # back to the first parameters: masks localized again (deterministic), images reused
    assert again["samples"] == a["samples"]
    assert all(torch.equal(again["masks"][c].layers[n], a["masks"][c].layers[n])
               for c in a["masks"] for n in a["masks"][c].layers)

    # per-prompt fidelity: off by default; when on, each non-memorized caption once, under one memorized
    # caption's own mask, in turn
    assert not [r for r in a["samples"] if r["setting"] == "wanda-own"]
    on = run_mitigation(tiny_pipe, Wanda(sparsity=0.01, n_steps=2), sub, [0], metric, tmp_path, gen, base,
                        per_prompt_fidelity=True)
    own = [r for r in on["samples"] if r["setting"] == "wanda-own"]
    assert [(r["caption"], r["mask_of"]) for r in own] == [(sub[2].caption, sub[0].caption),
                                                           (sub[3].caption, sub[1].caption)]
    sim = on["summary"]["non_memorized_similarity_per_prompt_mask"]
    assert sim["n"] == 2 and 0 < sim["min"] <= sim["mean"] <= 1
