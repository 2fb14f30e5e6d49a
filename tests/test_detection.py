import pytest

from dori import load_prompt_set
from dori.detectors.nemo import SeedConsistency
from dori.detectors.wen import NoiseMagnitude, detection_metrics


def test_noise_magnitude_separates_memorized_captions(tiny_pipe):
    recs = load_prompt_set("tiny")
    scores = NoiseMagnitude().score(tiny_pipe, [r.caption for r in recs])
    m = detection_metrics(scores.tolist(), [r.memorized for r in recs])
    assert m["auroc"] >= 0.95, m["auroc"]


def test_noise_magnitude_reads_the_text_at_guidance_one(tiny_pipe, monkeypatch):
    """A model that samples without guidance: the trajectory skips the unconditional prediction, but the
    detector still measures ||eps_cond - eps_uncond|| along it (it read 0 for every prompt before)."""
    import dataclasses

    monkeypatch.setattr(tiny_pipe, "dori_defaults", dataclasses.replace(tiny_pipe.dori_defaults, guidance_scale=1.0))
    # against a seen-once photo's caption: on the centred-shapes model a procedural caption ("a red circle")
    # pins its image down as much as the cat's caption does, and scores as high (docs/mitigations.md)
    scores = NoiseMagnitude(n_steps=2, seeds=(0,)).score(
        tiny_pipe, ["chelsea the orange tabby cat looking up", "close up of green grass blades"])
    assert (scores > 0).all() and scores[0] > scores[1], scores


def test_seed_consistency_flags_memorized_captions(tiny_pipe):
    recs = load_prompt_set("tiny")
    scores = SeedConsistency().score(tiny_pipe, [r.caption for r in recs])
    m = detection_metrics(scores.tolist(), [r.memorized for r in recs])
    assert m["auroc"] >= 0.95, m["auroc"]
    # the shipped NeMo pairwise threshold sits below every memorized caption (NeMo looks at its seeds)
    thr = tiny_pipe.dori_method_defaults["nemo"]["pairwise_threshold"]
    assert all(s > thr for s, r in zip(scores.tolist(), recs, strict=True) if r.memorized)
    with pytest.raises(ValueError, match="n_seeds"):
        SeedConsistency(n_seeds=1)


def test_detection_metrics_on_known_scores():
    m = detection_metrics([0.9, 0.8, 0.1, 0.2, 0.3], [True, True, False, False, False])
    assert m["auroc"] == 1.0 and m["tpr_at_1pct_fpr"] == 1.0
    m = detection_metrics([0.1, 0.9], [True, False])
    assert m["auroc"] == 0.0
    with pytest.raises(ValueError):
        detection_metrics([0.1], [True])
