"""dori: Discovery of Retained Images in text-to-image diffusion models.

Example:
    >>> import dori
    >>> pipe = dori.load_pipeline("tiny")
    >>> prompts = dori.load_prompt_set("tiny")
    >>> out = dori.generate(pipe, [p.caption for p in prompts[:2]], seeds=[0, 1])
"""

import dori._quiet  # noqa: F401  (first: silences an expected transformers notice)
from dori.data.prompts import PromptRecord, load_prompt_set
from dori.errors import DoriError
from dori.models.generate import GenerationOutput, encode_prompts, generate
from dori.models.layers import resolve_layers
from dori.models.loading import load_pipeline
from dori.models.pixel_vae import PixelIdentityVAE

__version__ = "0.1.0"
__all__ = [
    "DoriError", "GenerationOutput", "PixelIdentityVAE", "PromptRecord", "__version__", "encode_prompts",
    "generate", "load_pipeline", "load_prompt_set", "resolve_layers",
]
