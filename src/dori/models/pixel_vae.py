"""A pixel-space identity "VAE" so a Stable Diffusion pipeline can run directly on pixels.

The embedded tiny model denoises 32x32 RGB pixels instead of VAE latents (there is no pretrained
autoencoder we could ship or download). This module fills the pipeline's ``vae`` slot with the
identity map in SD's value convention: ``encode`` takes images in [-1, 1] and returns them unchanged
as the latent, ``decode`` returns the latent unchanged. ``block_out_channels=(3,)`` makes diffusers'
``vae_scale_factor`` equal 1 and ``scaling_factor=1`` leaves latents unscaled, so every piece of code
that works with ``pipe.vae`` (DoRI's target latent, the generation loop's decode) treats the tiny
model exactly like SD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class _PointDistribution:
    """Stands in for ``DiagonalGaussianDistribution`` with zero variance."""

    mean: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


class PixelIdentityVAE(ModelMixin, ConfigMixin):
    """Identity autoencoder: latents are pixels in [-1, 1].

    Args:
        in_channels: image channels (3).
        latent_channels: equal to ``in_channels``; present because SD code reads it.
        block_out_channels: ``(3,)`` so that ``2 ** (len(block_out_channels) - 1) == 1``.
        scaling_factor: 1.0, latents are not rescaled.

    Example:
        >>> vae = PixelIdentityVAE()
        >>> x = torch.rand(1, 3, 32, 32) * 2 - 1
        >>> torch.equal(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        True
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        scaling_factor: float = 1.0,
        sample_size: int = 32,
    ):
        super().__init__()
        if latent_channels != in_channels:
            raise ValueError("PixelIdentityVAE needs latent_channels == in_channels")
        # One persistent buffer so diffusers writes (and later expects) a weights file in vae/.
        self.register_buffer("identity_marker", torch.ones(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = _PointDistribution(x)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(sample, return_dict=return_dict)
