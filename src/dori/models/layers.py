"""Named layer groups of a UNet, resolved by module-name patterns (never hard-coded indices).

Layer ids are 1-based positions within a group, in the order the UNet computes them: down blocks,
then the mid block, then up blocks. On SD v1.4 ``"nemo-value"`` resolves to NeMo's layers 1-7.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dori.errors import DoriError

LAYER_GROUPS: dict[str, tuple[str, str]] = {
    "nemo-value": (r"^(down_blocks\.\d+|mid_block)\..*\.attn2\.to_v$",
                   "cross-attention value projections of the down and mid blocks (NeMo's layers)"),
    "value": (r"\.attn2\.to_v$", "all cross-attention value projections"),
    "ffn-out": (r"\.ff\.net\.2$", "second FFN linear of every transformer block (Wanda's reference layers)"),
}

_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class LayerRef:
    id: int  # 1-based within its group
    name: str  # module path inside the UNet
    module: torch.nn.Linear


def _order(name: str) -> tuple:
    stage = _STAGE.get(name.split(".")[0], 3)
    return (stage, [int(p) if p.isdigit() else p for p in name.split(".")])


def check_layer_group(group: str) -> None:
    """One clear error, with a did-you-mean, for a layer group :data:`LAYER_GROUPS` does not name."""
    if group not in LAYER_GROUPS:
        import difflib

        close = difflib.get_close_matches(group, list(LAYER_GROUPS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DoriError(f"unknown layer group {group!r}.{hint} Known: {', '.join(LAYER_GROUPS)}")


def resolve_layers(unet: torch.nn.Module, group: str) -> list[LayerRef]:
    """The linear layers of ``unet`` in a named group (see :data:`LAYER_GROUPS`), in compute order."""
    check_layer_group(group)
    pattern = re.compile(LAYER_GROUPS[group][0])
    found = [(n, m) for n, m in unet.named_modules() if pattern.search(n) and isinstance(m, torch.nn.Linear)]
    if not found:
        raise DoriError(f"layer group {group!r} matches no linear layer of this UNet ({type(unet).__name__})")
    found.sort(key=lambda nm: _order(nm[0]))
    return [LayerRef(i + 1, n, m) for i, (n, m) in enumerate(found)]
