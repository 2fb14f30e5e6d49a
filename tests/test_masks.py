import pytest
import torch

from dori.errors import DoriError
from dori.mitigations.masks import Mask, apply_mask, per_sample_neuron_masks
from dori.models.generate import generate
from dori.models.layers import resolve_layers


@pytest.fixture
def masks(tiny_pipe):
    v = resolve_layers(tiny_pipe.unet, "nemo-value")
    f = resolve_layers(tiny_pipe.unet, "ffn-out")
    neuron = Mask("neuron", {v[0].name: list(range(0, 32, 2)), v[3].name: [1, 5]}, {"method": "test"})
    weight = Mask("weight", {f[0].name: torch.arange(0, f[0].module.weight.numel(), 3)}, {"method": "test"})
    return neuron, weight


@pytest.mark.parametrize("which", [0, 1])
def test_mask_changes_output_and_restores_bit_exactly(tiny_pipe, masks, which, weights_hash):
    mask = masks[which]
    before_w = weights_hash(tiny_pipe.unet)
    kw = dict(seeds=[0], num_inference_steps=3)
    base = generate(tiny_pipe, ["a red circle on a blue background"], **kw).images
    with apply_mask(tiny_pipe, mask):
        pruned = generate(tiny_pipe, ["a red circle on a blue background"], **kw).images
        if mask.kind == "weight":
            assert weights_hash(tiny_pipe.unet) != before_w
    after = generate(tiny_pipe, ["a red circle on a blue background"], **kw).images
    assert (pruned - base).abs().max() > 1e-3
    assert torch.equal(after, base)
    assert weights_hash(tiny_pipe.unet) == before_w


def test_restores_even_when_the_block_raises(tiny_pipe, masks, weights_hash):
    before = weights_hash(tiny_pipe.unet)
    with pytest.raises(RuntimeError), apply_mask(tiny_pipe, masks[1]):
        raise RuntimeError("boom")
    assert weights_hash(tiny_pipe.unet) == before
    assert all(not m._forward_hooks for m in tiny_pipe.unet.modules())


def test_save_load_union_intersection_iou(tmp_path, masks):
    neuron, _ = masks
    neuron.save(tmp_path / "m")
    back = Mask.load(tmp_path / "m.json")
    assert back.kind == "neuron" and back.meta == neuron.meta
    assert all(torch.equal(back.layers[k], neuron.layers[k]) for k in neuron.layers)
    name = next(iter(neuron.layers))
    other = Mask("neuron", {name: [0, 1, 2, 3]})
    assert other.union(neuron).layers[name].tolist()[:4] == [0, 1, 2, 3]
    assert neuron.intersection(other).layers[name].tolist() == [0, 2]
    iou = neuron.iou(other)
    assert iou[name] == pytest.approx(2 / 18)
    assert neuron.iou(Mask("neuron", {}))[name] == 0.0
    assert Mask("neuron", {name: []}).iou(Mask("neuron", {name: []}))[name] == 1.0
    with pytest.raises(DoriError):
        neuron.union(masks[1])


def test_mask_for_another_model_is_a_clear_error(tiny_pipe):
    with pytest.raises(DoriError, match="not a linear layer of this UNet"), \
            apply_mask(tiny_pipe, Mask("neuron", {"down_blocks.9.foo": [1]})):
        pass


def test_per_sample_masks_equal_whole_batch_masks(tiny_pipe, masks):
    neuron, _ = masks
    name = next(iter(neuron.layers))
    width = dict(tiny_pipe.unet.named_modules())[name].out_features
    on = torch.zeros(width, dtype=torch.bool)
    on[neuron.layers[name]] = True
    caps = ["a red circle on a blue background"] * 2
    with per_sample_neuron_masks(tiny_pipe.unet, {name: torch.stack([on, torch.zeros_like(on)])}):
        both = generate(tiny_pipe, caps, seeds=[0], num_inference_steps=2, guidance_scale=1.0, batch_size=2).images
    with apply_mask(tiny_pipe, Mask("neuron", {name: neuron.layers[name]})):
        masked = generate(tiny_pipe, caps[:1], seeds=[0], num_inference_steps=2, guidance_scale=1.0).images
    plain = generate(tiny_pipe, caps[:1], seeds=[0], num_inference_steps=2, guidance_scale=1.0).images
    torch.testing.assert_close(both[0], masked[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], plain[0], atol=1e-5, rtol=0)
