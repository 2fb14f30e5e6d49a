"""Silence an expected notice of transformers: dori does not use torchvision, on purpose.

transformers 5.x warns, the first time a pipeline touches ``CLIPImageProcessor`` or ``SiglipImageProcessor``
(diffusers' pipeline modules do), that torchvision is missing and it falls back to the PIL image
processor, and it tells the reader to install torchvision. On a CPU host that would pull a multi-GB CUDA
build for nothing: dori never runs the pipeline's image processor (the safety checker is off). Only
messages containing "requires torchvision (not installed)" are dropped; every other transformers message
is left alone. Imported first by ``dori/__init__.py``.
"""

from __future__ import annotations

import logging

_NOTICE = "requires torchvision (not installed)"


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTICE not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
