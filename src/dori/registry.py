"""Registries of models, metrics, prompt sets (and later detectors, mitigations, attacks).

Targets are lazy ``"module:attribute"`` strings so that ``dori ls`` imports nothing heavy, and an
unknown name gets a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from dori.errors import DoriError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str
    description: str


class Registry:
    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str, description: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        self._entries[name] = Entry(name, target, description)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DoriError(
                f"unknown {self.family} {name!r}.{hint} Known: {', '.join(sorted(self._entries))} "
                "(`dori ls` lists them all)."
            )
        return self._entries[name]

    def get(self, name: str):
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


MODELS = Registry("model")
METRICS = Registry("metric")
PROMPT_SETS = Registry("prompt set")
ALL = {"models": MODELS, "metrics": METRICS, "prompt sets": PROMPT_SETS}

MODELS.register("tiny", "dori.models.loading:TINY_PATH",
                "embedded 32x32 pixel-space SD-structured model that memorizes 8 photos (no download)")
METRICS.register("pixel-ssim", "dori.metrics.pixel:PixelSSIM",
                 "SSIM at the model's resolution; threshold calibrated on held-out photos (tiny model)")
METRICS.register("sscd-nemo", "dori.metrics.sscd:sscd_nemo",
                 "SSCD cosine, NeMo protocol: sscd_disc_mixup, 320x320, ImageNet norm (local TorchScript)")
METRICS.register("sscd-wen", "dori.metrics.sscd:sscd_wen",
                 "SSCD cosine, Wen protocol: sscd_disc_large, resize 256, crop 224, norm 0.5 (local TorchScript)")
PROMPT_SETS.register("tiny", "dori.data.tiny:tiny_prompt_set",
                     "the tiny model's captions: memorized, seen once, held out, procedural, unseen")
