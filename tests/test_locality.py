import json
from pathlib import Path

import pytest
import torch

from dori.analyses.locality import (
    across_images,
    mask_agreement,
    mean_pairwise_l2,
    run_locality,
    summary_lines,
    trigger_spread,
)
from dori.errors import DoriError
from dori.mitigations.masks import Mask


def test_mean_pairwise_l2_averages_the_unordered_pairs():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])  # pairs: 3, 5, 4
    assert mean_pairwise_l2(x) == pytest.approx(4.0)
    assert mean_pairwise_l2(x[:1]) is None


def test_mask_agreement_is_per_layer_iou_with_both_empty_counting_one():
    names = ["a", "b", "c"]
    m1 = Mask("weight", {"a": [1, 2, 3, 4], "b": [7]})
    m2 = Mask("weight", {"a": [3, 4, 5, 6]})
    prompt = Mask("weight", {"a": [1, 2, 3, 4]})
    got = mask_agreement([m1, m2], prompt, names)
    # a: {1,2,3,4} vs {3,4,5,6}: 2/6; b: {7} vs nothing: 0; c: neither selects: 1
    assert got["pairwise"] == pytest.approx([2 / 6, 0.0, 1.0])
    # to the prompt's set: m1 a 1, b 0 (prompt empty there), c 1; m2 a 2/6, b 1, c 1
    assert got["to_prompt"] == pytest.approx([(1 + 2 / 6) / 2, 0.5, 1.0])
    assert got["trigger_size"] == pytest.approx([4.0, 0.5, 0.0]) and got["prompt_size"] == [4, 0, 0]
    assert got["pairs"] == 1 and got["empty"] == 0
    one = mask_agreement([m1], prompt, names)
    assert one["pairwise"] == [None, None, None] and one["pairs"] == 0


def test_across_images_pairs_only_triggers_of_different_images():
    names = ["a"]
    same = Mask("weight", {"a": [1, 2]})
    other = Mask("weight", {"a": [2, 3]})
    # image x's two identical sets are never compared with each other; x-y pairs: IoU 1/3 each
    assert across_images({"x": [same, same], "y": [other]}, names) == pytest.approx([1 / 3])
    assert across_images({"x": [same, same], "y": []}, names) == [None]


def test_trigger_spread_measures_moves_and_nearest_starts():
    starts = torch.zeros(3, 2, 2)
    starts[1, 0, 0], starts[2, 0, 0] = 10.0, 20.0
    trig = starts.clone()
    trig[:, 1, 1] = 1.0  # each moved by 1 from its own start
    trig[2, 0, 0] = 14.0  # the third moved 6 in x as well, nearer the second start (10) than its own (20)
    got = trigger_spread({"img": trig}, {"img": starts}, {"img": torch.zeros(2, 2)},
                         {"prompts": torch.zeros(2, 2, 2)})
    row = got["per_image"]["img"]
    assert row["kept"] == 3 and row["starts"] == pytest.approx((10 + 20 + 10) / 3)
    assert row["moved"] == pytest.approx((1 + 1 + (1 + 36) ** 0.5) / 3)
    assert row["nearest_own_start"] == pytest.approx(2 / 3)
    assert row["starts_to_prompt"] == pytest.approx((0 + 10 + 20) / 3)
    assert got["references"] == {"prompts": 0.0} and got["mean"]["triggers"] == row["triggers"]


def test_localize_from_the_prompts_own_embedding_gives_the_prompts_mask(tiny_pipe):
    """``embeds=`` is the prompt's path with the embedding given: the same selection, weight for weight."""
    from dori.analyses.demo import make_method
    from dori.data.tiny import tiny_prompt_set
    from dori.models.generate import encode_prompts

    cap = next(r.caption for r in tiny_prompt_set() if r.kind == "memorized")
    wanda = make_method("wanda", tiny_pipe, None)
    emb = encode_prompts(tiny_pipe, [cap])
    assert wanda.localize(tiny_pipe, "a label", embeds=emb).digest() == wanda.localize(tiny_pipe, cap).digest()
    nemo = make_method("nemo", tiny_pipe, None, {"n_seeds": 3})
    assert nemo.localize(tiny_pipe, "a label", embeds=emb).mask.digest() == nemo.localize(tiny_pipe, cap).mask.digest()
    # and the embedding is what is searched from, not the label: another caption's embedding, another result
    other = encode_prompts(tiny_pipe, ["a red circle on a blue background"])
    assert wanda.localize(tiny_pipe, cap, embeds=other).digest() != wanda.localize(tiny_pipe, cap).digest()
    assert nemo.localize(tiny_pipe, cap, embeds=other).memorized is False  # a procedural caption: nothing to find
    with pytest.raises(DoriError, match="one embedding"):
        wanda.localize(tiny_pipe, "two", embeds=emb.expand(2, -1, -1))


def test_layer_activations_are_the_layers_outputs(tiny_pipe):
    from dori.analyses.locality import activation_divergence, layer_activations
    from dori.models.generate import encode_prompts
    from dori.models.layers import resolve_layers

    emb = encode_prompts(tiny_pipe, ["a red circle on a blue background", "chelsea the orange tabby cat looking up"])
    acts = layer_activations(tiny_pipe, emb, "value", batch_size=1)  # two UNet calls, concatenated in order
    for ref in resolve_layers(tiny_pipe.unet, "value"):  # a value projection sees the text embedding only
        torch.testing.assert_close(acts[ref.name], ref.module(emb).detach())
    same = activation_divergence(tiny_pipe, {"twice": emb[:1].expand(2, -1, -1), "two": emb}, "ffn-out")
    assert same["groups"]["twice"] == pytest.approx([0.0] * len(same["layers"]))
    assert all(v > 0 for v in same["groups"]["two"])


def _run(out, **kw):
    args = dict(max_targets=2, starts=3, steps=10, methods=["wanda"], seeds=(0, 1), attack={"pairs": 2}, control=1)
    return run_locality(out, **{**args, **kw})


def _numbers(res):
    """Everything but the run's record and wall times."""
    if isinstance(res, dict):
        return {k: _numbers(v) for k, v in res.items() if k not in ("manifest", "seconds")}
    return res


def test_run_locality_finds_triggers_not_control_and_resumes(tmp_path, monkeypatch):
    """From random starts DoRI brings back memorized images, not the control's photos; a run started again
    redoes nothing, one killed midway redoes only what is missing, and one killed between a trigger's tensors
    and its record (other settings) leaves no record that vouches for the wrong tensors."""
    import copy

    import dori.reports.results as results
    from dori.attacks.dori import DoRI
    from dori.mitigations.wanda import Wanda
    from dori.reports.images import slug

    astronaut = "portrait of an astronaut in a white spacesuit before the american flag"
    res = _run(tmp_path)
    found = res["found"]
    assert found["memorized"]["starts"] == 6 and res["kept"][astronaut] >= 2
    assert found["memorized"]["replicate_at_start"] == 0  # random embeddings alone do not replicate
    assert found["control"]["images"] == 2 and found["control"]["replicate"] == 0
    on_disk = json.loads((tmp_path / "locality.json").read_text())
    assert _numbers(on_disk) == json.loads(json.dumps(_numbers(res)))
    assert (tmp_path / "plots" / "locality.png").is_file()
    wanda = res["weights"]["wanda"]
    assert all(v is not None and 0 <= v <= 1 for v in wanda["pairwise"] + wanda["to_prompt"])
    two_images = sum(k > 0 for k in res["kept"].values()) == 2
    assert all(v is not None for v in wanda["across_images"]) == two_images  # None: no pair of images to compare
    lines = summary_lines(res)
    assert len(lines) == 4 and "0 of 6 on 2 non-memorized images" in lines[0]
    forced = copy.deepcopy(res)
    forced["found"]["control"]["replicate"] = 2
    assert "warning: DoRI from random starts forced 2 triggers of non-memorized images" in summary_lines(forced)[1]

    calls = {"attack": 0, "localize": 0}

    def counted(name, real):
        def call(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        return call

    with monkeypatch.context() as m:
        m.setattr(DoRI, "attack", counted("attack", DoRI.attack))
        m.setattr(Wanda, "localize", counted("localize", Wanda.localize))
        assert _numbers(_run(tmp_path)) == _numbers(on_disk)
        assert calls == {"attack": 0, "localize": 0}  # finished: nothing redone
        # killed midway: the astronaut's trigger record and the record of one of its masks are missing
        (tmp_path / "triggers" / f"{slug(astronaut)}.json").unlink()
        next(iter((tmp_path / "masks" / "wanda" / slug(astronaut)).glob("start*.json"))).unlink()
        assert _numbers(_run(tmp_path)) == _numbers(on_disk)
        # its attack again (the same triggers: its other masks are reused), and that one mask
        assert calls == {"attack": 1, "localize": 1}

    class Killed(Exception):
        pass

    real_write = results.write_json

    def killed_at_a_trigger_record(path, obj):
        if "triggers" in Path(path).parts:
            raise Killed
        real_write(path, obj)

    with monkeypatch.context() as m:  # another attack seed, killed after its first trigger's tensors
        m.setattr(results, "write_json", killed_at_a_trigger_record)
        with pytest.raises(Killed):
            _run(tmp_path, seed=1)
    assert _numbers(_run(tmp_path)) == _numbers(on_disk)  # the seed-0 record did not vouch for seed 1's tensors
    other = _run(tmp_path, seed=1)  # another attack seed: new triggers, not the saved ones
    assert other["triggers"] != on_disk["triggers"]


@pytest.mark.parametrize(("kw", "match"), [({"methods": ["nemo", "esd"]}, "--methods"), ({"starts": 1}, "--starts"),
                                           ({"seeds": ()}, "--seeds"), ({"control": -1}, "--control"),
                                           ({"layer_group": "values"}, "Did you mean"),
                                           ({"steps": -1}, "attack: steps"), ({"attack": {"lr": 0}}, "attack: lr"),
                                           ({"metric": "sscd-nemo"}, "--sscd")])
def test_run_locality_refuses_bad_settings_before_loading(tmp_path, kw, match):
    with pytest.raises(DoriError, match=match):
        _run(tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_a_run_without_control_or_kept_triggers_says_so(tmp_path, caplog):
    """One step from random starts brings nothing back: the summary says there is nothing to compare, and a run
    without a control says that its triggers cannot be judged."""
    res = _run(tmp_path, max_targets=1, starts=2, steps=1, methods=[], control=0)
    assert res["found"]["memorized"]["replicate"] == 0 and res["found"]["control"]["images"] == 0
    lines = summary_lines(res)
    assert "no non-memorized control was attacked" in lines[0]
    assert lines[1].startswith("1. embedding space: no image has 2 triggers") and len(lines) == 2
    assert "no non-memorized control is attacked (--control 0)" in caplog.text
