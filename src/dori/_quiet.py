"""Silence two expected notices of the libraries dori loads models with; every other message is left alone.

- transformers 5.x warns, the first time a pipeline touches ``CLIPImageProcessor`` or
  ``SiglipImageProcessor`` (diffusers' pipeline modules do), that torchvision is missing and it falls back
  to the PIL image processor, and it tells the reader to install torchvision. On a CPU host that would pull
  a multi-GB CUDA build for nothing: dori never runs the pipeline's image processor (the safety checker is
  off). Messages containing "requires torchvision (not installed)" are dropped.
- diffusers warns, on loading the embedded tiny model, that its VAE is not an ``AutoencoderKL``: it is
  dori's pixel-space identity VAE (:mod:`dori.models.pixel_vae`), on purpose. Only that message, naming
  ``PixelIdentityVAE``, is dropped.

Imported first by ``dori/__init__.py``.
"""

from __future__ import annotations

import logging

_NOTICES = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.pipelines.pipeline_utils": ("Expected types for vae", "PixelIdentityVAE"),
}


class _DropNotice(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(p in message for p in self.parts)


for _name, _parts in _NOTICES.items():
    logging.getLogger(_name).addFilter(_DropNotice(_parts))
