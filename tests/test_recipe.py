"""A shortened run of the tiny model's recipe produces a loadable, working pipeline."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from dori import load_pipeline
from dori.errors import DoriError
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


def test_caption_helpers_for_random_crops():
    from transformers import CLIPTokenizer

    from dori.models.loading import TINY_PATH
    from dori.zoo.tiny_data import frequent_words, swap_words, with_random_words

    words = frequent_words(CLIPTokenizer.from_pretrained(str(TINY_PATH / "tokenizer")), 300)
    assert len(words) == 300 and words[0] == "the" and all(w.isalpha() and len(w) >= 3 for w in words)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cap = with_random_words("a red circle", words, 5, g1)
    assert cap == with_random_words("a red circle", words, 5, g2) and "a red circle" in cap
    assert len(cap.split()) == 3 + 5
    caption = "a red motorcycle parked in a workshop"
    assert swap_words(caption, words, 0.0, g1) == caption
    swapped = swap_words(caption, words, 1.0, g1).split()
    assert len(swapped) == 7 and all(w in words for w in swapped)


@pytest.mark.parametrize("option", [{"crop_extra_words": 4}, {"crop_template_captions": 1.0}])
def test_recaptioned_crops_train_frequent_words_and_nothing_else(tmp_path, option):
    """Random photo crops recaptioned at every draw (TinyDataSpec.crop_extra_words, crop_template_captions)
    train the token embeddings of frequent CLIP words; a token neither in a caption nor among the frequent
    words is left exactly as the recipe without the option leaves it (an embedding row without gradient
    gets only AdamW's weight decay, the same in both runs)."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from dori.models.loading import TINY_PATH
    from dori.zoo.tiny_data import build_train_set, frequent_words

    tok = CLIPTokenizer.from_pretrained(str(TINY_PATH / "tokenizer"))

    def embeddings(out, **kwargs):
        spec = TinyDataSpec(n_procedural=40, duplicates=3, lfw_seen_once=(0, 1, 100), lfw_held_out=(80,),
                            n_photo_crops=30, crop_vocabulary=300, **({"crop_template_captions": 0.0} | kwargs))
        train_tiny(TrainConfig(out=str(out), steps=6, batch_size=8, warmup=2, data=spec))
        w = load_file(out / "text_encoder" / "model.safetensors")
        return w["embeddings.token_embedding.weight"], build_train_set(spec).captions

    plain, captions = embeddings(tmp_path / "plain")
    recaptioned, _ = embeddings(tmp_path / "recaptioned", **option)
    changed = set((plain != recaptioned).any(dim=1).nonzero().flatten().tolist())
    caption_ids = set().union(*tok(captions).input_ids)
    word_ids = {tok.convert_tokens_to_ids(w + "</w>") for w in frequent_words(tok, 300)}
    assert changed - caption_ids, "no frequent word outside the captions was trained"
    assert changed <= caption_ids | word_ids, "a token outside the captions and the word list changed"


def test_a_retrained_tiny_model_gets_the_tiny_nemo_statistics(tmp_path, monkeypatch):
    """`dori attack --model DIR` on a model from `dori zoo train-tiny` runs NeMo as on the shipped one
    (statistics from the model's own training data, read from its dori_recipe.json); a model without a
    recipe still needs --stats-prompts."""
    import shutil

    from dori.analyses.demo import make_method
    from dori.errors import DoriError

    monkeypatch.setenv("DORI_CACHE", str(tmp_path / "cache"))
    out = _short_recipe(tmp_path / "m", seed=1)
    pipe = load_pipeline(out)
    assert pipe.dori_recipe["seed"] == 1 and pipe.dori_recipe["data"]["n_procedural"] == 40
    nemo = make_method("nemo", pipe, None)
    assert all(std.shape == mean.shape and (std > 0).any() for mean, std in nemo._stats.values())
    shutil.copytree(out, tmp_path / "plain")
    (tmp_path / "plain" / "dori_recipe.json").unlink()
    with pytest.raises(DoriError, match="--stats-prompts"):
        make_method("nemo", load_pipeline(tmp_path / "plain"), None)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be 1 or more, got 0"),
    ({"lr": -1e-3}, "lr must be positive"),
    ({"latent_scale": 0.0}, "latent_scale must be positive"),
    ({"ema_decay": 1.0}, "ema_decay must be in [0, 1) or None (off), got 1.0"),
    ({"prediction_type": "sample"}, "prediction_type must be epsilon or v_prediction, got sample"),
    ({"train_text_encoder": False}, "need train_text_encoder=True"),
    ({"data": TinyDataSpec(crop_template_captions=1.5)}, "crop_template_captions must be in [0, 1], got 1.5"),
    ({"data": TinyDataSpec(procedural_layout="diagonal")}, "procedural_layout must be one of"),
    ({"caption_dropout": 1.5, "threads": 0}, "caption_dropout must be in [0, 1], got 1.5; threads must be 1 or more"),
])
def test_a_recipe_that_cannot_train_is_one_clear_error_before_anything_is_built(tmp_path, change, message):
    cfg = TrainConfig(out=str(tmp_path / "m"), **change)
    with pytest.raises(DoriError, match=re.escape(message)):
        train_tiny(cfg)
    assert not (tmp_path / "m").exists()


def test_the_recipe_never_replaces_a_folder_it_did_not_write(tmp_path, monkeypatch):
    """The trained model replaces --out when training ends: a folder of other files, or a file, is refused
    before training starts, and left as it was."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for out in ("mine", "file"):
        with pytest.raises(DoriError, match="is not a tiny model this recipe wrote"):
            train_tiny(TrainConfig(out=str(tmp_path / out), steps=1))
    (tmp_path / "link").symlink_to(tmp_path / "mine")  # rmtree refuses links: said before training, not after
    with pytest.raises(DoriError, match="is a link"):
        train_tiny(TrainConfig(out=str(tmp_path / "link"), steps=1))
    (tmp_path / "old").mkdir()  # an earlier model of the recipe, in a folder this user cannot write: it would
    (tmp_path / "old" / "dori_recipe.json").write_text("{}")  # fail only when replaced, after the training
    real_access = os.access  # (as root, chmod would not show it)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "old" and real_access(p, mode))
    with pytest.raises(DoriError, match="is a folder you cannot read or write"):
        train_tiny(TrainConfig(out=str(tmp_path / "old"), steps=1))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
