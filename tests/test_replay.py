import pytest
import torch

from dori.mitigations.masks import per_sample_neuron_masks
from dori.models.layers import resolve_layers
from dori.models.replay import PrefixReplay


def _case(pipe, seed=0, s=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, 3, 32, 32, generator=g)
    e = torch.randn(s, 77, pipe.text_encoder.config.hidden_size, generator=g)
    return x, e


def _masks(layers, n_samples, per_layer):
    """layer -> B x out bool (True = off); ``per_layer[name]`` lists the neurons off in every sample."""
    return {r.name: torch.zeros(n_samples, r.module.out_features, dtype=torch.bool).index_fill_(
        1, torch.tensor(per_layer.get(r.name, []), dtype=torch.long), True) for r in layers}


@torch.no_grad()
def _forward(unet, x, e, masks):
    with per_sample_neuron_masks(unet, masks):
        return unet(x, 500, encoder_hidden_states=e).sample


def test_a_replayed_prefix_gives_the_full_forward_and_skips_work(tiny_pipe):
    unet = tiny_pipe.unet
    layers = resolve_layers(unet, "value")
    last = layers[-1].name
    x, e = _case(tiny_pipe)
    state = {r.name: [0, 5] for r in layers}
    changed = state | {last: [5]}  # one neuron of the last layer back on
    with PrefixReplay(unet, [r.name for r in layers]) as replay:
        with replay.session(None):
            _forward(unet, x, e, _masks(layers, 3, state))
        replay.adopt()
        before = replay.replayed
        with replay.session([last]):
            one = _forward(unet, x, e, _masks(layers, 3, changed))
        assert replay.replayed > before
        before = replay.replayed
        with replay.session([last], repeat=2):  # two candidates in one call: the state's prefix tiled
            two = _forward(unet, x.repeat(2, 1, 1, 1), e.repeat(2, 1, 1), _masks(layers, 6, changed))
        assert replay.replayed > before
        assert "up_blocks.2.resnets.0" in replay.units  # a ModuleList's children are units, not the list
    assert not any("forward" in m.__dict__ for m in unet.modules())  # every wrapped forward restored
    full = _forward(unet, x, e, _masks(layers, 3, changed))
    assert torch.equal(one, full)
    torch.testing.assert_close(two, full.repeat(2, 1, 1, 1), rtol=0, atol=1e-5)
    assert not torch.equal(full, _forward(unet, x, e, _masks(layers, 3, state)))  # the change mattered


def test_nothing_is_replayed_for_other_inputs_or_an_adopted_candidate_is_its_own_forward(tiny_pipe):
    unet = tiny_pipe.unet
    layers = resolve_layers(unet, "value")
    names = [r.name for r in layers]
    x, e = _case(tiny_pipe)
    x2, _ = _case(tiny_pipe, seed=1)
    state = {names[0]: [1]}
    with PrefixReplay(unet, names) as replay:
        with replay.session(None):
            _forward(unet, x, e, _masks(layers, 3, state))
        replay.adopt()
        with replay.session([names[-1]]):
            other = _forward(unet, x2, e, _masks(layers, 3, state))
        assert replay.replayed == 0
        # adopt the second of two candidates, then replay it whole (nothing changed)
        cands = _masks(layers, 6, state)
        cands[names[-1]][3:, 2] = True
        with replay.session([names[-1]], repeat=2):
            _forward(unet, x.repeat(2, 1, 1, 1), e.repeat(2, 1, 1), cands)
        replay.adopt(1, 2)
        adopted = _masks(layers, 3, state | {names[-1]: [2]})
        with replay.session([]):
            again = _forward(unet, x, e, adopted)
    torch.testing.assert_close(other, _forward(unet, x2, e, _masks(layers, 3, state)), rtol=0, atol=0)
    torch.testing.assert_close(again, _forward(unet, x, e, adopted), rtol=0, atol=1e-5)


def test_other_arguments_or_an_unknown_layer_are_never_replayed(tiny_pipe):
    unet = tiny_pipe.unet
    layers = resolve_layers(unet, "value")
    names = [r.name for r in layers]
    x, e = _case(tiny_pipe)
    masks = _masks(layers, 3, {})
    with PrefixReplay(unet, names) as replay, per_sample_neuron_masks(unet, masks), torch.no_grad():
        with replay.session(None):
            unet(x, 500, encoder_hidden_states=e)
        replay.adopt()
        with replay.session([]):  # the same forward: replayed whole
            unet(x, 500, encoder_hidden_states=e)
        assert replay.replayed > 0
        before = replay.replayed
        with replay.session([]):  # another timestep: nothing replayed
            other_t = unet(x, 400, encoder_hidden_states=e).sample
        with replay.session([]):  # another keyword argument: nothing replayed
            unet(x, 500, encoder_hidden_states=e, cross_attention_kwargs={"scale": 0.5})
        assert replay.replayed == before
        with pytest.raises(ValueError, match="not a changeable layer"), replay.session(["conv_in"]):
            pass
    with per_sample_neuron_masks(unet, masks), torch.no_grad():
        torch.testing.assert_close(other_t, unet(x, 400, encoder_hidden_states=e).sample, rtol=0, atol=0)
