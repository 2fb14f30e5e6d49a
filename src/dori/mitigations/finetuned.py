"""A fine-tuned UNet as a mitigation: the weights it changed, swapped in and out like a mask.

A mitigation that fine-tunes (concept ablation, unlearning, adversarial fine-tuning) yields a UNet of the
same architecture with other weights. :class:`FineTunedUNet` reads such a UNet (diffusers' safetensors,
never a pickle) and compares it, parameter by parameter, with the UNet of the model under audit (the
unmitigated one): the parameters that differ make a :class:`WeightPatch`, which goes wherever a
:class:`~dori.mitigations.masks.Mask` goes. :func:`~dori.mitigations.masks.apply_mask` swaps the changed
weights in and restores the model bit-exactly on exit, so the generation loop and DoRI are the same as
for a pruning mask, the unmitigated rows and the non-memorized control stay on the unmitigated model, and
the before/after table and the bypass rows of the fine-tune sit beside NeMo's and Wanda's
(``dori attack --finetuned NAME=PATH``; ``run_demo(finetuned={NAME: PATH})``).

Only the UNet is taken. DoRI optimizes the text encoder's output, so a fine-tuned text encoder is outside
what it attacks; a pipeline folder whose text encoder differs from the model's is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dori.errors import DoriError
from dori.mitigations.masks import check_mask_set_name
from dori.reports.results import tensor_digest, write_json

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model"


@dataclass
class WeightPatch:
    """The UNet parameters a fine-tune changed: name -> new values (on the CPU, in the model's dtype).

    ``len`` is the number of single weights that differ from the unmitigated UNet (the "mask size" of the
    tables), ``counts`` the same per parameter. A patch stands for one fine-tuned model, the same for
    every caption: its union with itself is itself.
    """

    layers: dict[str, torch.Tensor]
    changed: dict[str, int]
    meta: dict = field(default_factory=dict)
    kind: str = "patch"
    sha: str = field(default="", repr=False)  # computed once: hashing an SD UNet takes seconds

    def __post_init__(self):
        if not self.sha:
            parts = [f"{n}:{tensor_digest(self.layers[n])}" for n in sorted(self.layers)]
            self.sha = hashlib.sha1("|".join(["patch", *parts]).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return sum(self.changed.values())

    def counts(self) -> dict[str, int]:
        return dict(self.changed)

    def digest(self) -> str:
        """A short content hash of the new values (not the metadata)."""
        return self.sha

    def union(self, other: WeightPatch) -> WeightPatch:
        if getattr(other, "kind", None) != "patch" or other.digest() != self.digest():
            raise DoriError("the weights of two different fine-tunes cannot be combined into one mitigation")
        return dataclasses.replace(self, meta={"combined_from": [self.meta, other.meta]})

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json``, a record of the patch (source, digest, counts); the weights stay in the
        fine-tuned model's own files, which a run does not copy."""
        path = Path(path)
        write_json(path.parent / f"{path.name}.json",
                   {"kind": self.kind, "digest": self.digest(), "meta": self.meta, "counts": self.counts()})
        return path

    @contextmanager
    def applied(self, unet: torch.nn.Module):
        """The fine-tuned weights inside the ``with`` block; the unmitigated ones, bit for bit, after it."""
        params = dict(unet.named_parameters())
        saved = []
        try:
            for name, new in self.layers.items():
                p = params[name]
                saved.append((p, p.detach().to("cpu", copy=True)))
                p.data.copy_(new)
            yield
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.data.copy_(old)


def unet_weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of the UNet at ``path`` (a pipeline folder with ``unet/``, a UNet folder, or
    one ``.safetensors`` file), and the pipeline's ``text_encoder`` folder if it has one."""
    unet, text = path, None
    if path.is_dir() and (path / "unet").is_dir():
        unet, text = path / "unet", (path / "text_encoder" if (path / "text_encoder").is_dir() else None)
    if unet.is_file() and unet.suffix == ".safetensors":
        return [unet], None
    if not unet.is_dir():
        raise DoriError(f"fine-tuned UNet {path}: not found; give a diffusers pipeline folder (with unet/), a UNet "
                        "folder (config.json and diffusion_pytorch_model.safetensors) or a UNet .safetensors file")
    for index in (unet / f"{WEIGHTS}.safetensors.index.json", unet / f"{WEIGHTS}.fp16.safetensors.index.json"):
        if index.is_file():  # sharded: the index names each parameter's file
            return sorted({unet / f for f in json.loads(index.read_text())["weight_map"].values()}), text
    for name in (f"{WEIGHTS}.safetensors", f"{WEIGHTS}.fp16.safetensors"):
        if (unet / name).is_file():
            return [unet / name], text
    pickles = sorted(p.name for p in unet.glob("*.bin")) + sorted(p.name for p in unet.glob("*.ckpt"))
    hint = (f" It has {pickles[0]}, a pickle, which dori never loads: save the UNet with safetensors "
            "(UNet2DConditionModel.from_pretrained(...).save_pretrained(DIR), safe_serialization is the "
            "default)." if pickles else "")
    raise DoriError(f"fine-tuned UNet {path}: no {WEIGHTS}.safetensors in {unet}.{hint}")


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise DoriError(f"fine-tuned UNet: {f} is missing (named by the sharded weights' index)")
        out.update(load_file(str(f)))
    return out


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def weight_patch(base: torch.nn.Module, tuned: dict[str, torch.Tensor], source: str) -> WeightPatch:
    """The weights of ``tuned`` (a UNet's state dict) that differ from ``base``'s, in ``base``'s dtype.

    Weights are compared in the coarser of the two dtypes, so a fine-tune saved in half precision from a
    model run in single precision changes only the weights its training changed; the others keep the
    model's own values.
    """
    params = dict(base.named_parameters())
    missing, extra = sorted(set(params) - set(tuned)), sorted(set(tuned) - set(params))
    shapes = [n for n in params if n in tuned and tuple(tuned[n].shape) != tuple(params[n].shape)]
    if missing or extra or shapes:
        first = (f"{len(missing)} of the model's parameters missing, e.g. {missing[0]!r}" if missing else
                 f"{len(extra)} parameters the model lacks, e.g. {extra[0]!r}" if extra else
                 f"{len(shapes)} of another shape, e.g. {shapes[0]!r}: {tuple(tuned[shapes[0]].shape)} against "
                 f"{tuple(params[shapes[0]].shape)}")
        raise DoriError(f"fine-tuned UNet {source} is not a UNet of this model's architecture ({first}); it must "
                        "be the model's UNet fine-tuned, in diffusers' parameter names (convert an original "
                        "checkpoint with diffusers' conversion script first)")
    layers, changed, dtypes = {}, {}, set()
    for name, p in params.items():
        old, t = p.detach().cpu(), tuned[name]
        if t.dtype != old.dtype and t.is_floating_point():
            dtypes.add(str(t.dtype).removeprefix("torch."))
            c = _coarser(t.dtype, old.dtype)
            same = old.to(c) == t.to(c)
            new = torch.where(same, old, t.to(old.dtype))
        else:
            same, new = old == t, t
        if not bool(same.all()):
            layers[name], changed[name] = new.contiguous(), int((~same).sum())
    if dtypes:
        log.warning("fine-tuned UNet %s is saved in %s and the model runs in %s: its weights equal to the model's at "
                    "the coarser precision are taken as unchanged", source, "/".join(sorted(dtypes)),
                    str(next(iter(params.values())).dtype).removeprefix("torch."))
    return WeightPatch(layers, changed, {"source": source})


def _text_encoder_differs(pipe, folder: Path, source: Path) -> bool:
    """Whether the text encoder saved in ``folder`` has other weights than the pipeline's (loaded as
    transformers loads it, so files of older transformers versions, with other key names, compare right)."""
    if not any(folder.glob("*.safetensors")):
        raise DoriError(f"fine-tuned model {source}: its text encoder has no safetensors weights (dori never loads "
                        f"pickles), so it cannot be checked against the model's; give {source / 'unet'} to take the "
                        "UNet alone")
    own = pipe.text_encoder
    saved = type(own).from_pretrained(str(folder), use_safetensors=True).state_dict()
    mine = own.state_dict()
    return set(saved) != set(mine) or any(
        not torch.equal(saved[n].to(mine[n].dtype), mine[n].detach().cpu()) for n in mine)


class FineTunedUNet:
    """A mitigation given as a fine-tuned UNet of the audited model, used like NeMo, Wanda or
    :class:`~dori.mitigations.masks.SavedMasks`: :meth:`localize` gives every caption the same
    :class:`WeightPatch`, and ``name`` is the setting of its rows. See the module docstring."""

    saves_masks = False  # the run records the patch (masks/NAME/_joint.json), not a copy of its weights

    def __init__(self, name: str, path: str | Path, taken: set[str] = frozenset()):
        check_mask_set_name(name, taken, "fine-tune", "--finetuned ablated=models/sd-ablated")
        self.name, self.path = name, Path(path)
        self.files, self.text_encoder = unet_weight_files(self.path)  # a bad path fails before the model loads
        self._patch: WeightPatch | None = None

    def check(self, pipe, captions) -> None:
        """Read the weights now: a UNet of another architecture fails before any image is generated."""
        self.patch(pipe)

    def patch(self, pipe) -> WeightPatch:
        if self._patch is None:
            if self.text_encoder is not None and _text_encoder_differs(pipe, self.text_encoder, self.path):
                raise DoriError(f"fine-tuned model {self.path}: its text encoder differs from the model's. DoRI "
                                "attacks the text encoder's output, so --finetuned takes a fine-tuned UNet only; "
                                "to audit that whole model as it is, give it as --model with --mitigation none")
            patch = weight_patch(pipe.unet, _read(self.files), str(self.path))
            patch.meta["method"] = self.name
            if not patch.layers:
                log.warning("fine-tuned UNet %s has the same weights as the model's UNet: the mitigation %r changes "
                            "nothing", self.path, self.name)
            self._patch = patch
        return self._patch

    def localize(self, pipe, prompt: str) -> WeightPatch:
        patch = self.patch(pipe)
        return dataclasses.replace(patch, meta={**patch.meta, "prompt": prompt})

    def __repr__(self) -> str:  # the report's and results.json's record of the mitigation: with its digest once read
        digest = f", digest={self._patch.digest()!r}" if self._patch is not None else ""
        return f"FineTunedUNet(name={self.name!r}, path={str(self.path)!r}{digest})"
