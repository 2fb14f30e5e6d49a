"""SSCD copy-detection similarity with the two named protocols of the literature.

SSCD (Pizzi et al., CVPR 2022) ships TorchScript descriptor models. dori never downloads them: pass
the path of a local ``.torchscript.pt`` file. Descriptors are L2-normalised; the similarity is their
cosine; replicated when > 0.7 (the convention of the memorization literature, not SSCD's own
calibrated threshold).

- ``sscd-nemo`` (NeMo, Hintersdorf et al. 2024): ``sscd_disc_mixup``; resize to 320 x 320;
  ImageNet mean/std. NeMo reports the median +- median absolute deviation over images.
- ``sscd-wen`` (Wen et al. 2024): ``sscd_disc_large``; resize the shorter side to 256, centre crop
  224; mean = std = 0.5.

Resizing uses bilinear interpolation with antialiasing (torchvision's tensor ``Resize`` default).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dori.errors import DoriError
from dori.metrics.base import ReplicationMetric

SSCD_THRESHOLD = 0.7
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _resize_shorter(x: torch.Tensor, shorter: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h <= w:
        return _resize(x, (shorter, int(shorter * w / h)))
    return _resize(x, (int(shorter * h / w), shorter))


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class SSCD(ReplicationMetric):
    """SSCD cosine similarity under a named protocol.

    Args:
        model_path: local TorchScript file (``sscd_disc_mixup.torchscript.pt`` for ``nemo``,
            ``sscd_disc_large.torchscript.pt`` for ``wen``).
        protocol: ``"nemo"`` or ``"wen"``.
        device: where to run the descriptor model.
        batch_size: images per forward pass.
    """

    PROTOCOLS = {
        "nemo": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, expected="sscd_disc_mixup"),
        "wen": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), expected="sscd_disc_large"),
    }

    def __init__(self, model_path: str | Path, protocol: str = "nemo", device: str = "cpu",
                 batch_size: int = 32, model: torch.nn.Module | None = None):
        if protocol not in self.PROTOCOLS:
            raise DoriError(f"unknown SSCD protocol {protocol!r}; use 'nemo' or 'wen'")
        self.protocol, self.name, self.threshold = protocol, f"sscd-{protocol}", SSCD_THRESHOLD
        self.device, self.batch_size = device, batch_size
        self.source = str(model_path)  # which network scored (part of a run's item keys)
        if model is None:
            path = Path(model_path).expanduser()
            if not path.is_file():
                raise DoriError(
                    f"SSCD model file not found: {path}. dori does not download it: get "
                    f"{self.PROTOCOLS[protocol]['expected']}.torchscript.pt from the sscd-copy-detection "
                    "release page and pass its local path."
                )
            try:
                model = torch.jit.load(str(path), map_location=device)
            except RuntimeError as e:
                raise DoriError(f"{path} is not a TorchScript SSCD model ({str(e).splitlines()[0]})") from e
        self.model = model.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``N x 3 x H x W`` in [0, 1] -> the protocol's network input."""
        x = images.float().clamp(0, 1)
        if self.protocol == "nemo":
            x = _resize(x, (320, 320))
        else:
            x = _center_crop(_resize_shorter(x, 256), 224)
        p = self.PROTOCOLS[self.protocol]
        mean = torch.tensor(p["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(p["std"], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size].to(self.device))
            out.append(F.normalize(self.model(x).float(), dim=-1).cpu())
        return torch.cat(out)


def sscd_nemo(model_path: str | Path, **kw) -> SSCD:
    return SSCD(model_path, protocol="nemo", **kw)


def sscd_wen(model_path: str | Path, **kw) -> SSCD:
    return SSCD(model_path, protocol="wen", **kw)
