"""dori: Discovery of Retained Images in text-to-image diffusion models.

Example:
    >>> import dori
    >>> pipe = dori.load_pipeline("tiny")
    >>> prompts = dori.load_prompt_set("tiny")
    >>> out = dori.generate(pipe, [p.caption for p in prompts[:2]], seeds=[0, 1])
"""

import importlib

import dori._quiet  # noqa: F401  (first: silences an expected transformers notice)
from dori.errors import DoriError

__version__ = "0.1.0"
# imported on first use (PEP 562), so that `dori --help` and option parsing do not wait for torch and diffusers
_LAZY = {
    "PromptRecord": "dori.data.prompts", "load_prompt_set": "dori.data.prompts",
    "GenerationOutput": "dori.models.generate", "encode_prompts": "dori.models.generate",
    "generate": "dori.models.generate", "resolve_layers": "dori.models.layers",
    "load_pipeline": "dori.models.loading", "PixelIdentityVAE": "dori.models.pixel_vae",
}
__all__ = ["DoriError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:  # a subpackage, as `dori.models` after `import dori`
        try:
            value = importlib.import_module(f"dori.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dori.{name}":
                raise
            raise AttributeError(f"module 'dori' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
