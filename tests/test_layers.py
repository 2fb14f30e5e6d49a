"""Layer groups resolve by name on the real SD v1.4 / v2 block layouts (tiny width, no download)."""

import pytest
from diffusers import UNet2DConditionModel

from dori.errors import DoriError
from dori.models.layers import resolve_layers

SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=8, norm_num_groups=8,
)


def sd14_unet():
    # SD v1.4's layout: (320, 640, 1280, 1280) / 10, 8 heads, cross-attention dim 768 / 24
    return UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), attention_head_dim=8,
                                cross_attention_dim=32, **SD_BLOCKS)


def sd2_unet():
    # SD v2's layout: head dims (5, 10, 20, 20), linear projections, cross-attention dim 1024 / 32
    return UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8),
                                use_linear_projection=True, cross_attention_dim=32, **SD_BLOCKS)


NEMO_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
]


@pytest.mark.parametrize("build", [sd14_unet, sd2_unet])
def test_nemo_layers_are_sd_layer_ids_1_to_7(build):
    layers = resolve_layers(build(), "nemo-value")
    assert [layer.name for layer in layers] == NEMO_LAYERS
    assert [layer.id for layer in layers] == list(range(1, 8))
    assert [layer.module.out_features for layer in layers] == [32, 32, 64, 64, 128, 128, 128]


@pytest.mark.parametrize("build", [sd14_unet, sd2_unet])
def test_all_value_and_ffn_groups(build):
    unet = build()
    values = resolve_layers(unet, "value")
    ffn = resolve_layers(unet, "ffn-out")
    assert len(values) == len(ffn) == 16  # 6 down + 1 mid + 9 up transformer blocks
    assert values[:7] == resolve_layers(unet, "nemo-value")
    assert values[-1].name.startswith("up_blocks.3.attentions.2")
    assert all(f.name.endswith("ff.net.2") for f in ffn)


def test_tiny_model_groups(tiny_pipe):
    nemo = resolve_layers(tiny_pipe.unet, "nemo-value")
    assert [n.name.split(".")[0] for n in nemo] == ["down_blocks"] * 3 + ["mid_block"]
    assert len(resolve_layers(tiny_pipe.unet, "value")) == 10


def test_unknown_group_suggests():
    with pytest.raises(DoriError, match="Did you mean 'nemo-value'"):
        resolve_layers(sd14_unet(), "nemo-valu")


def test_nemo_reference_neuron_lists_map_onto_sd_layers_1_to_7(tmp_path):
    """NeMo's reference code hooks down_blocks[b].attentions[a] (list b * 2 + a), then the mid block: the 7
    lists of its CSV are nemo-value's layers 1-7 in order."""
    from types import SimpleNamespace

    from dori.mitigations.nemo import read_reference_masks

    lists = [[i, i + 10] for i in range(7)]
    (tmp_path / "stats.csv").write_text(f"Caption;URL;Initial Neurons;Initial SSIM;Refined Neurons;Refined SSIM\n"
                                        f"a photo;u;{lists};0.3;{lists[::-1]};0.2\n")
    masks = read_reference_masks(tmp_path / "stats.csv", SimpleNamespace(unet=sd14_unet()))
    got = {n: v.tolist() for n, v in masks["a photo"].layers.items()}
    assert got == dict(zip(NEMO_LAYERS, lists[::-1], strict=True))  # the refined column, in the reference's order
