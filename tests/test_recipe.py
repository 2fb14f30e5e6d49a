"""A shortened run of the tiny model's recipe produces a loadable, working pipeline."""

import json

import pytest
import torch

from dori import load_pipeline
from dori.models.generate import generate
from dori.zoo.tiny_data import TinyDataSpec
from dori.zoo.train_tiny import TrainConfig, train_tiny


@pytest.mark.parametrize("scale, fused", [(1.0, False), (2.0, False), (1.0, True)])
def test_short_recipe_trains_and_loads(tmp_path, monkeypatch, scale, fused):
    adamw, made = torch.optim.AdamW, []

    def spy(*args, **kwargs):  # the optimizer the recipe builds, and how
        made.append(kwargs)
        return adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    spec = TinyDataSpec(n_procedural=40, duplicates=3, lfw_seen_once=(0, 1, 100), lfw_held_out=(80,))
    out = train_tiny(TrainConfig(out=str(tmp_path / "m"), steps=6, batch_size=4, warmup=2, data=spec,
                                 latent_scale=scale, fused_optimizer=fused))
    recipe = json.loads((out / "dori_recipe.json").read_text())
    assert recipe["steps"] == 6 and recipe["data"]["duplicates"] == 3
    assert recipe["fused_optimizer"] == fused and [k.get("fused") for k in made] == [True if fused else None]
    assert not (tmp_path / "m.partial").exists()
    pipe = load_pipeline(out)
    img = generate(pipe, ["a red circle on a blue background"], seeds=[0], num_inference_steps=2).images
    assert img.shape == (1, 3, 32, 32)
    # scaled latents: the VAE divides them back; x0 is clipped to the latents' range, not rescaled
    assert pipe.vae.config.scaling_factor == scale
    assert pipe.scheduler.config.thresholding == (scale == 1.0)
    assert scale == 1.0 or pipe.scheduler.config.clip_sample_range == scale


def _short_recipe(out, **kwargs):
    spec = TinyDataSpec(n_procedural=40, duplicates=3, lfw_seen_once=(0, 1, 100), lfw_held_out=(80,),
                        n_photo_crops=8, procedural_layout="centred")
    return train_tiny(TrainConfig(out=str(out), steps=6, batch_size=4, warmup=2, data=spec, **kwargs))


def test_recipe_saves_the_weight_average_when_asked(tmp_path):
    from safetensors.torch import load_file

    def unet(path):
        return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")

    last = unet(_short_recipe(tmp_path / "last"))
    # decay 0: the average is the last weights (the average must not change the training itself)
    same = unet(_short_recipe(tmp_path / "ema0", ema_decay=0.0))
    assert all(torch.allclose(same[k], last[k], atol=1e-6, rtol=0) for k in last)
    averaged = unet(_short_recipe(tmp_path / "ema", ema_decay=0.9))
    assert any(not torch.allclose(averaged[k], last[k], atol=1e-4, rtol=0) for k in last)
    recipe = json.loads((tmp_path / "ema" / "dori_recipe.json").read_text())
    assert recipe["ema_decay"] == 0.9 and recipe["data"]["procedural_layout"] == "centred"
