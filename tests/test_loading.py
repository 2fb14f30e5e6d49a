import json
import re
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

import dori
from dori import load_pipeline
from dori.errors import DoriError
from dori.models.loading import TINY_PATH
from dori.models.pixel_vae import PixelIdentityVAE


def test_tiny_loads_as_stable_diffusion_pipeline(tiny_pipe):
    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert isinstance(tiny_pipe.vae, PixelIdentityVAE)
    assert tiny_pipe.vae_scale_factor == 1
    assert tiny_pipe.dori_defaults.resolution == 32
    assert all(not p.requires_grad for p in tiny_pipe.unet.parameters())


def test_plain_diffusers_from_pretrained_loads_the_shipped_folder():
    # `import dori.models.pixel_vae` (done above) is all diffusers needs for the pixel-space VAE class
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_PATH), safety_checker=None, requires_safety_checker=False)
    img = pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=2.0,
               height=32, width=32, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)


def test_loading_does_not_tell_the_user_to_install_torchvision():
    # transformers 5.x advises installing torchvision when diffusers' SD pipeline module touches
    # CLIPImageProcessor; dori filters that notice (dori/_quiet.py), so a CPU user is not sent to a CUDA build
    load = "from diffusers import StableDiffusionPipeline; import transformers; transformers.CLIPImageProcessor"

    def stderr(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr

    if "requires torchvision" not in stderr(load):  # torchvision installed, or a transformers without the notice
        pytest.skip("no torchvision notice to filter in this environment")
    assert "requires torchvision" not in stderr("import dori; " + load)
    assert "requires torchvision" not in stderr("import dori; dori.load_pipeline('tiny')")



def test_loading_the_tiny_model_does_not_warn_about_its_pixel_vae():
    # diffusers warns that the tiny model's VAE is not an AutoencoderKL: it is dori's pixel-space one, on
    # purpose; dori/_quiet.py drops that one message, at the level diffusers warns at by default
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = logging.getLogger("diffusers")
    level = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        load_pipeline("tiny")
        utils = logging.getLogger("diffusers.pipelines.pipeline_utils")
        utils.warning("Expected types for vae: (AutoencoderKL,), got <class 'dori.models.pixel_vae.PixelIdentityVAE'>.")
        utils.warning("Expected types for unet: another")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert seen == ["Expected types for unet: another"]  # any other such warning still reaches the user


def test_shipped_folder_is_small():
    size = sum(p.stat().st_size for p in TINY_PATH.rglob("*") if p.is_file())
    assert size < 30e6, f"tiny model folder is {size / 1e6:.1f} MB"


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DoriError, match="not found"):
        load_pipeline(str(tmp_path / "nope" / "model"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(DoriError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_uncached_hub_id_offline_names_the_id_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DoriError) as e:
        load_pipeline("CompVis/stable-diffusion-v1-4")
    assert "CompVis/stable-diffusion-v1-4" in str(e.value)
    assert "huggingface-cli download" in str(e.value)


def test_dtype_and_defaults_file():
    pipe = load_pipeline("tiny", dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    d = json.loads((TINY_PATH / "dori_defaults.json").read_text())
    assert pipe.dori_defaults.guidance_scale == d["guidance_scale"]
    assert pipe.dori_defaults.guidance_rescale == d["guidance_rescale"] == 0.5
    assert dori.__version__


@pytest.mark.weights
def test_real_sd_pipeline_loads_and_resolves_nemo_layers():
    """DORI_SD_PATH=/path/to/stable-diffusion-v1-4 pytest -m weights"""
    import os

    from dori.models.layers import resolve_layers

    pipe = load_pipeline(os.environ["DORI_SD_PATH"])
    assert len(resolve_layers(pipe.unet, "nemo-value")) == 7


def test_model_id_follows_the_weights(tiny_pipe):
    """Run items are keyed by model_id: a changed weight must change it (a retrained model is recomputed)."""
    import torch

    from dori.models.loading import model_id, weights_fingerprint

    before = model_id(tiny_pipe)
    assert before.startswith("tiny@") and weights_fingerprint(tiny_pipe) == tiny_pipe.dori_fingerprint
    w = next(tiny_pipe.unet.parameters())  # conv_in's weight, channels-last: index it, do not view it
    first = (0,) * w.dim()
    old = w.detach()[first].clone()
    with torch.no_grad():
        w[first] += 1.0
        try:
            assert weights_fingerprint(tiny_pipe) != tiny_pipe.dori_fingerprint
        finally:
            w[first] = old
    assert weights_fingerprint(tiny_pipe) == tiny_pipe.dori_fingerprint and model_id(tiny_pipe) == before


def test_unet_convolutions_are_channels_last(tiny_pipe):
    """load_pipeline puts the UNet in channels-last memory format (faster convolutions), values unchanged."""
    import torch

    convs = [m.weight for m in tiny_pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_a_device_this_torch_cannot_use_is_one_clear_error(monkeypatch):
    from dori.models.loading import check_device

    check_device("cpu")
    with pytest.raises(DoriError, match="'gpu' is not a device: use cpu, cuda, cuda:N or mps"):
        load_pipeline("tiny", device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DoriError, match="'cuda:0': this PyTorch .* has no CUDA"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(DoriError, match=re.escape("'cuda:2': this process sees 2 GPU(s), cuda:0 to cuda:1")):
        check_device("cuda:2")
