"""Masks: first-class, reversible pruning of neurons or weights.

A :class:`Mask` maps named UNet layers to indices:
- ``kind="neuron"``: output channels (neurons) of a linear layer; deactivating one zeroes that channel
  of the layer's output (NeMo);
- ``kind="weight"``: flat indices into the layer's weight matrix (row * in_features + col); those
  weights are set to zero (Wanda).

Masks are saved as safetensors (indices) + JSON (metadata: model, method, parameters, prompt), can be
unioned and intersected, and are applied with :func:`apply_mask`, a context manager that restores the
model bit-exactly on exit. Neuron masks act through a forward hook and never touch the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from dori.errors import DoriError
from dori.reports.results import write_atomic, write_safetensors

KINDS = ("neuron", "weight")


@dataclass
class Mask:
    """Named layer -> sorted unique int64 indices. See the module docstring for ``kind``."""

    kind: str
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DoriError(f"mask kind must be one of {KINDS}, got {self.kind!r}")
        self.layers = {k: torch.as_tensor(v, dtype=torch.long).flatten().unique() for k, v in self.layers.items()}

    def __len__(self) -> int:
        return sum(v.numel() for v in self.layers.values())

    def counts(self) -> dict[str, int]:
        return {k: int(v.numel()) for k, v in self.layers.items()}

    def _combine(self, other: Mask, op) -> Mask:
        if other.kind != self.kind:
            raise DoriError(f"cannot combine a {self.kind} mask with a {other.kind} mask")
        names = sorted(set(self.layers) | set(other.layers))
        empty = torch.empty(0, dtype=torch.long)
        out = {}
        for n in names:
            a, b = self.layers.get(n, empty), other.layers.get(n, empty)
            out[n] = op(a, b)
        return Mask(self.kind, out, {"combined_from": [self.meta, other.meta]})

    def union(self, other: Mask) -> Mask:
        return self._combine(other, lambda a, b: torch.cat([a, b]).unique())

    def intersection(self, other: Mask) -> Mask:
        return self._combine(other, lambda a, b: a[torch.isin(a, b)])

    def iou(self, other: Mask) -> dict[str, float]:
        """Per-layer intersection over union (1.0 when both are empty)."""
        inter, uni = self.intersection(other), self.union(other)
        return {n: (inter.layers[n].numel() / uni.layers[n].numel()) if uni.layers[n].numel() else 1.0
                for n in uni.layers}

    def digest(self) -> str:
        """A short content hash of the kind and the indices (not the metadata)."""
        import hashlib

        from dori.reports.results import tensor_digest

        parts = [self.kind] + [f"{n}:{tensor_digest(self.layers[n])}" for n in sorted(self.layers)]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (indices) and ``<path>.json`` (kind, layers, metadata), the JSON last: a
        save killed midway leaves no JSON, so no saved mask is read back half-written."""
        base, js, st = mask_files(path)
        tensors = {f"layer{i}": v for i, v in enumerate(self.layers.values())}
        js.unlink(missing_ok=True)  # a replaced mask's record must never vouch for the new indices
        write_safetensors(st, tensors)
        info = {"kind": self.kind, "layers": list(self.layers), "meta": self.meta, "counts": self.counts()}
        write_atomic(js, json.dumps(info, indent=2, default=str))
        return base

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        _, js, st = mask_files(path)
        if not js.is_file() or not st.is_file():
            raise DoriError(f"mask files not found: need both {js} and {st} (written by Mask.save)")
        info = json.loads(js.read_text())
        tensors = load_file(str(st))
        layers = {name: tensors[f"layer{i}"] for i, name in enumerate(info["layers"])}
        return cls(info["kind"], layers, info.get("meta", {}))


def mask_files(path: str | Path) -> tuple[Path, Path, Path]:
    """``(X, X.json, X.safetensors)`` for ``X``, ``X.json`` or ``X.safetensors`` (``X`` may hold dots)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return base, base.parent / f"{base.name}.json", base.parent / f"{base.name}.safetensors"


def _modules(unet: torch.nn.Module, mask: Mask) -> Iterator[tuple[str, torch.nn.Linear]]:
    mods = dict(unet.named_modules())
    for name in mask.layers:
        if name not in mods or not isinstance(mods[name], torch.nn.Linear):
            raise DoriError(f"mask layer {name!r} is not a linear layer of this UNet; was the mask made for "
                            "another model? (mask meta: " + json.dumps(mask.meta.get("model")) + ")")
        yield name, mods[name]


@contextmanager
def apply_mask(pipe_or_unet, mask: Mask | None):
    """Apply ``mask`` inside the ``with`` block; the model is restored bit-exactly on exit. A fine-tuned
    UNet's :class:`~dori.mitigations.finetuned.WeightPatch` is applied the same way.

    Example:
        >>> with apply_mask(pipe, mask):
        ...     images = generate(pipe, prompts, seeds=[0]).images
    """
    if mask is None:
        yield
        return
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if mask.kind == "patch":  # a fine-tuned UNet's weights (dori.mitigations.finetuned.WeightPatch)
        with mask.applied(unet):
            yield
        return
    handles, saved = [], []
    try:
        for name, mod in _modules(unet, mask):
            idx = mask.layers[name].to(mod.weight.device)
            if mask.kind == "neuron":
                if idx.numel() and int(idx.max()) >= mod.out_features:
                    raise DoriError(f"mask neuron index {int(idx.max())} out of range for {name} "
                                    f"({mod.out_features} neurons)")
                handles.append(mod.register_forward_hook(_zero_channels(idx)))
            else:
                flat = mod.weight.data.view(-1)
                if idx.numel() and int(idx.max()) >= flat.numel():
                    raise DoriError(f"mask weight index out of range for {name}")
                saved.append((flat, idx, flat[idx].clone()))
                flat[idx] = 0
        yield
    finally:
        for h in handles:
            h.remove()
        for flat, idx, values in saved:
            flat[idx] = values


def _zero_channels(idx: torch.Tensor):
    def hook(module, args, output):
        return output.index_fill(-1, idx, 0.0)

    return hook


@contextmanager
def per_sample_neuron_masks(unet: torch.nn.Module, masks: dict[str, torch.Tensor]):
    """Deactivate a different set of neurons for every sample of a batch (batched candidate checks).

    Args:
        masks: layer name -> bool tensor ``B x out_features`` (True = deactivated) where B is the UNet
            batch of every call made inside the block.
    """
    handles = []

    def hook_for(keep: torch.Tensor):
        def hook(module, args, output):
            if output.shape[0] != keep.shape[0]:
                raise RuntimeError(f"per-sample mask for batch {keep.shape[0]} got a batch of {output.shape[0]}")
            return output * keep.view(keep.shape[0], *([1] * (output.ndim - 2)), keep.shape[1])

        return hook

    try:
        for name, m in masks.items():
            mod = unet.get_submodule(name)
            keep = (~m.bool()).to(mod.weight.dtype).to(mod.weight.device)
            handles.append(mod.register_forward_hook(hook_for(keep)))
        yield
    finally:
        for h in handles:
            h.remove()


# the settings dori's own mitigations and the plain model take, and the bypass table's own row names
RESERVED_NAMES = ("none", "nemo", "wanda", "memorized", "non-memorized")


def check_mask_set_name(name: str, taken: set[str] = frozenset(), what: str = "mask set",
                        example: str = "--masks mine=DIR/masks/wanda") -> None:
    """A saved mask set's (or a fine-tune's) name is a folder name and the setting of its rows: it must not be
    another's."""
    import re

    lower = name.lower()  # folders of names differing in case are one folder on some file systems
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or lower in RESERVED_NAMES \
            or lower.endswith(("-joint", "-own")) or lower in {t.lower() for t in taken}:
        raise DoriError(f"{what} name {name!r}: use letters, digits, '_', '.' or '-' (a folder and row name), "
                        f"not one of {', '.join(RESERVED_NAMES)} nor another mask set's or fine-tune's name (in any "
                        f"case), and not ending in -joint or -own; e.g. {example}")


class SavedMasks:
    """A mitigation given as masks saved earlier (:meth:`Mask.save`), to audit any mask: ``dori attack
    --masks NAME=PATH`` or ``run_demo(masks={NAME: PATH})``.

    ``path`` is either one mask (``X.json``, ``X.safetensors`` or ``X``), applied for every caption (e.g.
    the joint mask an owner would deploy, ``DIR/masks/wanda/_joint``), or a folder of masks, each caption
    taking the mask whose metadata names it as its ``prompt`` (the per-caption masks ``dori mitigate``
    writes under ``DIR/masks/<method>``, or masks another tool wrote in this format). It is used like NeMo
    or Wanda: :meth:`localize` returns a caption's mask, and ``name`` is the setting of its rows.
    """

    def __init__(self, name: str, path: str | Path, taken: set[str] = frozenset()):
        check_mask_set_name(name, taken)  # taken: the names of the run's other mask sets
        self.name, self.path = name, Path(path)
        _, js, _ = mask_files(self.path)
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.json"))
            by_prompt: dict[str, Path] = {}
            for f in self.files:
                prompt = _read_mask_json(f).get("meta", {}).get("prompt")
                if prompt is None:
                    continue  # e.g. the joint mask beside the per-caption ones
                if prompt in by_prompt:
                    raise DoriError(f"masks {by_prompt[prompt].name} and {f.name} in {self.path} are both for "
                                    f"the prompt {prompt[:60]!r}: keep one")
                by_prompt[prompt] = f
            if not by_prompt:
                raise DoriError(f"{self.path} holds no mask whose metadata names its prompt: give a folder "
                                "written by dori mitigate (DIR/masks/<method>) or one mask file for every caption")
            self.by_prompt: dict[str, Path] | None = by_prompt
        elif js.is_file():
            _read_mask_json(js)
            self.files, self.by_prompt = [js], None
        else:
            raise DoriError(f"mask set {name!r}: {self.path} is neither a folder of masks nor a mask file "
                            "(X.json with X.safetensors, written by Mask.save or dori mitigate)")

    def require(self, captions) -> None:
        """Fail now, not mid-run, if a caption has no mask."""
        missing = [c for c in captions if self.by_prompt is not None and c not in self.by_prompt]
        if missing:
            raise DoriError(f"mask set {self.name!r} ({self.path}) has no mask for {len(missing)} caption(s), e.g. "
                            f"{missing[0][:60]!r}: add them, attack fewer captions (max_targets in a run file), or "
                            "give one mask file to apply for every caption")

    def check(self, pipe, captions) -> None:
        """Fail before any image is generated if a caption's mask does not fit this model's UNet, or the
        masks mix neuron and weight masks (their union, the joint mask, would be undefined)."""
        kinds = set()
        for c in dict.fromkeys(captions):
            mask = self.localize(pipe, c)
            kinds.add(mask.kind)
        if len(kinds) > 1:
            raise DoriError(f"mask set {self.name!r} ({self.path}) mixes neuron and weight masks: give one kind")

    def params(self) -> dict:
        """A digest of the source files' bytes: changed masks are never mistaken for the run's saved copies."""
        import hashlib

        h = hashlib.sha1()
        for js in self.files:
            for f in mask_files(js)[1:]:
                h.update(f.name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
        return {"digest": h.hexdigest()[:16]}

    def localize(self, pipe, prompt: str) -> Mask:
        """The saved mask for ``prompt``; its own metadata is kept, and also whole under ``source_meta``."""
        self.require([prompt])
        js = self.by_prompt[prompt] if self.by_prompt is not None else self.files[0]
        mask = Mask.load(js)
        list(_modules(pipe.unet, mask))  # a mask made for another model fails here, with its layer's name
        mask.meta = {**mask.meta, "method": self.name, "prompt": prompt, "source": str(js), "source_meta": mask.meta}
        return mask

    def __repr__(self) -> str:
        return f"SavedMasks(name={self.name!r}, path={str(self.path)!r})"


def _read_mask_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise DoriError(f"{path} is not a mask's JSON (written by Mask.save): {e}") from None
    if isinstance(info, dict) and info.get("kind") == "patch":
        raise DoriError(f"{path} records a fine-tuned UNet ({info.get('meta', {}).get('source')}), not a mask: "
                        "attack it with --finetuned NAME=<that source>")
    if not isinstance(info, dict) or "kind" not in info or "layers" not in info:
        raise DoriError(f"{path} is not a mask's JSON (written by Mask.save): it lacks kind and layers")
    st = mask_files(path)[2]
    if not st.is_file():
        raise DoriError(f"mask {path} has no {st.name} beside it")
    return info
