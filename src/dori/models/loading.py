"""Load any Stable Diffusion 1.x/2.x pipeline, or the embedded tiny model, as a diffusers pipeline.

Offline by default: a hub id must already be in the local Hugging Face cache. Nothing is downloaded
unless ``offline=False`` is passed explicitly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dori.errors import DoriError

log = logging.getLogger(__name__)

TINY_PATH = Path(__file__).resolve().parent.parent / "zoo" / "tiny"


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults of a model: SD's (50 steps, guidance 7.5) unless its folder says otherwise."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    resolution: int | None = None  # None: unet.sample_size * vae_scale_factor


def _read_defaults(folder: Path) -> GenerationDefaults:
    f = folder / "dori_defaults.json"
    if not f.is_file():
        return GenerationDefaults()
    d = json.loads(f.read_text())
    return GenerationDefaults(**{f.name: d[f.name] for f in fields(GenerationDefaults) if f.name in d})


def resolve_model_path(name_or_path: str | os.PathLike) -> Path | str:
    """``"tiny"`` -> the shipped folder; an existing folder -> itself; anything else is a hub id."""
    name = str(name_or_path)
    if name == "tiny":
        if not (TINY_PATH / "model_index.json").is_file():
            raise DoriError(
                f"the embedded tiny model is missing from {TINY_PATH}. Reinstall dori (`pip install -e .`) "
                "or rebuild it with `dori zoo train-tiny --out <dir>` and pass that folder."
            )
        return TINY_PATH
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise DoriError(
                f"{p} is not a diffusers pipeline folder (no model_index.json). Pass the folder that "
                "`StableDiffusionPipeline.save_pretrained` wrote, or a hub id already in the local cache."
            )
        return p
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise DoriError(
            f"model {name!r} not found: no such folder, and it is not a hub id of the form 'org/name'. "
            "Use 'tiny', a local diffusers folder, or a hub id such as 'CompVis/stable-diffusion-v1-4'."
        )
    return name


def check_device(device: str | torch.device) -> None:
    """One clear error for a device this PyTorch cannot use: a typo, or CUDA on a CPU-only build or host."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DoriError(f"device {str(device)!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise DoriError(f"device {str(device)!r}: this PyTorch ({torch.__version__}) has no CUDA ({why}); "
                            "use --device cpu, or install a CUDA build of PyTorch on a machine with a GPU")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DoriError(f"device {str(device)!r}: this process sees {n} GPU(s), cuda:0 to cuda:{n - 1} (a run "
                            "of many processes gives each cuda:<local rank>: let each see every GPU)")


def load_pipeline(
    name_or_path: str | os.PathLike = "tiny",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offline: bool = True,
):
    """Load a Stable Diffusion pipeline (``diffusers.StableDiffusionPipeline``).

    Args:
        name_or_path: ``"tiny"`` (the embedded model), a local diffusers folder, or a hub id
            (e.g. ``"CompVis/stable-diffusion-v1-4"``) that is already in the local cache.
        dtype: parameter dtype (float32 on CPU; float16 is fine on GPUs).
        device: where to put the pipeline.
        offline: if True (default) never touch the network; a hub id missing from the cache is an error.

    Returns:
        The pipeline, with its safety checker removed (it is not part of the audited model), the UNet
        and text encoder in eval mode with gradients off, the UNet's weights in channels-last memory
        format (faster convolutions; ``save_pretrained`` writes them as usual), ``pipe.dori_defaults`` set
        (:class:`GenerationDefaults`).

    Example:
        >>> pipe = load_pipeline("tiny")
        >>> pipe.unet.config.sample_size
        32
    """
    from diffusers import StableDiffusionPipeline

    import dori.models.pixel_vae  # noqa: F401  (diffusers finds the tiny model's VAE class among imported modules)

    check_device(device)
    target = resolve_model_path(name_or_path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(target), dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=offline,
        )
    except (OSError, ValueError) as e:
        if isinstance(target, Path):
            raise DoriError(f"could not load the pipeline in {target}: {e}") from e
        from huggingface_hub.constants import HF_HUB_CACHE

        raise DoriError(
            f"hub model {target!r} is not in the local cache ({HF_HUB_CACHE}) and dori does not download "
            f"by default. On a machine with network run `huggingface-cli download {target}` (then copy the "
            "cache), or save the pipeline to a folder and pass its path; pass offline=False to allow a "
            f"download. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.eval().requires_grad_(False)
    # channels-last convolutions (diffusers' advice for SD): tiny UNet forward 0.32 -> 0.25 s at batch 32
    # on 2 CPU cores, forward+backward 0.64 -> 0.59 s; outputs differ by ~3e-6, weights keep their values
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.dori_defaults = _read_defaults(target) if isinstance(target, Path) else GenerationDefaults()
    # per-model settings of the methods (e.g. the tiny model's calibrated NeMo threshold), if shipped
    f = target / "dori_defaults.json" if isinstance(target, Path) else None
    pipe.dori_method_defaults = json.loads(f.read_text()).get("methods", {}) if f and f.is_file() else {}
    # a tiny model (the shipped one, or one retrained by `dori zoo train-tiny`) carries its recipe
    r = target / "dori_recipe.json" if isinstance(target, Path) else None
    pipe.dori_recipe = json.loads(r.read_text()) if r and r.is_file() else None
    pipe.dori_name = str(name_or_path)
    pipe.dori_fingerprint = weights_fingerprint(pipe)
    return pipe


def weights_fingerprint(pipe) -> str:
    """A short hash of the UNet's and text encoder's weights (names, shapes, first values of each)."""
    return modules_fingerprint([pipe.unet, pipe.text_encoder])


def modules_fingerprint(modules) -> str:
    """A short hash of the modules' weights: every tensor's name, shape and first 1,024 values."""
    import hashlib

    h = hashlib.sha1()
    for m in modules:
        for n, p in m.state_dict().items():
            h.update(f"{n}{tuple(p.shape)}".encode())
            h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def model_id(pipe) -> str:
    """The model's name and weights fingerprint, part of the key of every cached run item: a run directory
    reused after the weights changed (a retrained tiny model, a fine-tune) recomputes instead of reusing."""
    fp = getattr(pipe, "dori_fingerprint", None)
    if fp is None:
        fp = pipe.dori_fingerprint = weights_fingerprint(pipe)
    return f"{getattr(pipe, 'dori_name', None)}@{fp}"
