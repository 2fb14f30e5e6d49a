"""The one generation loop of dori: prompts or prompt embeddings in, images out.

Every stage generates through :func:`generate`; every UNet evaluation, in sampling and in attacks,
goes through :func:`predict_noise`. Mitigations therefore act only through hooks or masks on
``pipe.unet`` and attacks only through the prompt embedding.

Seeding: the initial noise of a sample depends only on its seed (drawn on the CPU with
``torch.Generator().manual_seed(seed)``), never on the batch or the device, so the same (prompt, seed)
gives the same image whatever else is in the batch, and a mitigated and an unmitigated model start
from identical noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from tqdm.auto import tqdm

from dori.errors import DoriError


@dataclass
class GenerationOutput:
    """Result of :func:`generate`, samples in prompt-major order (prompt 0 seed 0, prompt 0 seed 1, ...).

    Attributes:
        images: ``N x 3 x H x W`` in [0, 1] (None when ``stop_after`` ended the loop early).
        seeds: the seed of each sample.
        prompt_index: which prompt / embedding each sample came from.
        noise_preds: if requested, one entry per executed step: a tensor ``2 x N x C x h x w`` holding the
            unconditional and the text-conditional noise prediction.
        timesteps: the timesteps that were executed.
    """

    images: torch.Tensor | None
    seeds: list[int]
    prompt_index: list[int]
    noise_preds: list[torch.Tensor] | None
    timesteps: list[int]


def unet_place(pipe) -> tuple[torch.device, torch.dtype]:
    """The UNet's device and dtype, read from its first parameter (diffusers' ``unet.device`` and
    ``unet.dtype`` walk every submodule on each access: a measurable cost in loops of small UNet calls)."""
    p = next(pipe.unet.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings ``N x 77 x D`` exactly as SD computes them (padded to the tokenizer's max length)."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].to(unet_place(pipe)[1])


def one_embedding(pipe, embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` (``tokens x D`` or ``1 x tokens x D``, e.g. a DoRI trigger) as one ``1 x tokens x D`` embedding
    on the UNet's device and dtype; one clear error for any other shape."""
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise DoriError(f"expected one embedding (1 x tokens x dim), got shape {tuple(embeds.shape)}")
    dev, dtype = unet_place(pipe)
    return embeds.to(dev, dtype)


def predict_noise(pipe, latents: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor) -> torch.Tensor:
    """One UNet evaluation in the model's own parameterization (``eps_theta(latents, t, embeds)`` for an
    epsilon model, ``v_theta`` for a v-prediction model such as SD 2.x-768); differentiable."""
    return pipe.unet(latents, t, encoder_hidden_states=embeds).sample


def _abar(scheduler, t, like: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()]
    return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a.to(like.dtype)


def to_epsilon(scheduler, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
    """The noise prediction ``eps`` from a UNet output in the scheduler's ``prediction_type``
    (detectors and NeMo read noise predictions, whatever the model predicts)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    a = _abar(scheduler, t, latents)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * latents
    if kind == "sample":
        return (latents - a.sqrt() * output) / (1 - a).sqrt()
    raise DoriError(f"unknown prediction_type {kind!r} in the scheduler config")


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """What the UNet learns to output for ``x_t = sqrt(abar_t) clean + sqrt(1 - abar_t) noise``: the
    noise, the velocity ``sqrt(abar_t) noise - sqrt(1 - abar_t) clean`` or the clean sample, by the
    scheduler's ``prediction_type`` (the training loss, and DoRI's)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _abar(scheduler, t, clean)
        return a.sqrt() * noise - (1 - a).sqrt() * clean
    if kind == "sample":
        return clean
    raise DoriError(f"unknown prediction_type {kind!r} in the scheduler config")


def denoising_loss(pipe, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   embeds: torch.Tensor) -> torch.Tensor:
    """Per-sample training loss (mean squared error to :func:`training_target`) of ``clean`` latents noised
    with ``noise`` to timesteps ``t``, conditioned on ``embeds``; differentiable (DoRI's loss, and
    ``benchmarks/retention_loss.py``'s)."""
    pred = predict_noise(pipe, pipe.scheduler.add_noise(clean, noise, t), t, embeds)  # sqrt(abar) clean + ...
    return (pred.float() - training_target(pipe.scheduler, clean, noise, t).float()).pow(2).flatten(1).mean(1)


def model_resolution(pipe) -> int:
    """The side of the square images the model makes by default (its ``dori_defaults``, else the UNet's)."""
    return pipe.dori_defaults.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def initial_noise(pipe, seeds: Sequence[int], resolution: int | None = None) -> torch.Tensor:
    """The starting latents ``x_T`` for each seed (CPU-drawn, so identical on every device)."""
    res = resolution or model_resolution(pipe)
    shape = (pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(*unet_place(pipe))


def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the latents the UNet is trained on (VAE mean times its scaling factor; pixels for
    the tiny model's identity VAE), on the UNet's device and dtype, without gradient."""
    dev, dtype = unet_place(pipe)
    with torch.no_grad():
        x = images.to(dev, dtype) * 2 - 1
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]."""
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def generate(
    pipe,
    prompts: Sequence[str] | None = None,
    *,
    prompt_embeds: torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float | None = None,
    negative_embeds: torch.Tensor | None = None,
    batch_size: int = 16,
    resolution: int | None = None,
    return_noise_preds: bool = False,
    with_uncond: bool = False,
    stop_after: int | None = None,
    grad: bool = False,
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> GenerationOutput:
    """Sample images for every (prompt, seed) pair with classifier-free guidance.

    Args:
        pipe: a pipeline from :func:`dori.load_pipeline`.
        prompts: captions; or give ``prompt_embeds`` (``P x 77 x D``) instead, e.g. a DoRI trigger.
        seeds: the seeds generated for every prompt.
        num_inference_steps, guidance_scale: default to the model's (``pipe.dori_defaults``).
        guidance_rescale: diffusers' guidance rescale (Lin et al. 2023; ``rescale_noise_cfg``, the
            ``guidance_rescale`` of its SD pipelines), applied where guidance is above 1; default: the
            model's (0, plain guidance, unless its ``dori_defaults.json`` says otherwise; the tiny model 0.5).
        negative_embeds: the unconditional embedding (``1 x 77 x D``); default: the empty prompt's.
        batch_size: samples per UNet call (CFG doubles the UNet batch).
        return_noise_preds: keep the unconditional and conditional noise prediction of every step (as
            ``eps``, converted from the model's output for v-prediction models). At guidance 1 the
            unconditional one is not computed (it is the conditional one there) unless ``with_uncond``.
        with_uncond: compute the unconditional prediction even at guidance 1, where the trajectory does
            not use it (a detector's ``||eps_cond - eps_uncond||`` along an unguided trajectory).
        stop_after: run only the first k denoising steps (detectors); ``images`` is then None.
        grad: keep the autograd graph (a differentiable path through the whole sampler).
        callback: called as ``callback(step, t, latents)`` after each step.

    Returns:
        :class:`GenerationOutput`.

    Example:
        >>> out = generate(pipe, ["a red circle on a blue background"], seeds=[0, 1])
        >>> out.images.shape
        torch.Size([2, 3, 32, 32])
    """
    if (prompts is None) == (prompt_embeds is None):
        raise DoriError("generate() needs exactly one of `prompts` or `prompt_embeds`")
    if prompt_embeds is None:
        prompt_embeds = encode_prompts(pipe, prompts)
    if prompt_embeds.ndim != 3:
        raise DoriError(f"prompt_embeds must be P x tokens x dim, got shape {tuple(prompt_embeds.shape)}")
    d = pipe.dori_defaults
    steps = num_inference_steps or d.num_inference_steps
    gs = d.guidance_scale if guidance_scale is None else guidance_scale
    rescale = d.guidance_rescale if guidance_rescale is None else guidance_rescale
    if not 0.0 <= rescale <= 1.0:
        raise DoriError(f"guidance_rescale must lie in [0, 1] (0: plain guidance), got {rescale}")
    need_uncond = gs != 1.0 or with_uncond
    if negative_embeds is None and need_uncond:
        negative_embeds = encode_prompts(pipe, [""])
    seeds = [int(s) for s in seeds]
    n_prompts = prompt_embeds.shape[0]
    pidx = [p for p in range(n_prompts) for _ in seeds]
    sidx = [s for _ in range(n_prompts) for s in seeds]

    scheduler = copy.deepcopy(pipe.scheduler)  # schedulers keep per-run state
    device, dtype = unet_place(pipe)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if stop_after is not None:
        timesteps = timesteps[:stop_after]

    images, noise_preds = [], [[] for _ in timesteps] if return_noise_preds else None
    chunks = range(0, len(pidx), batch_size)
    with torch.set_grad_enabled(grad):
        for start in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            bp, bs = pidx[start : start + batch_size], sidx[start : start + batch_size]
            cond = prompt_embeds[bp].to(device, dtype)
            latents = initial_noise(pipe, bs, resolution) * scheduler.init_noise_sigma
            sched = copy.deepcopy(scheduler)
            for i, t in enumerate(timesteps):
                x_in = sched.scale_model_input(latents, t)
                if need_uncond:
                    neg = negative_embeds.to(cond).expand(len(bp), -1, -1)
                    eps_u, eps_c = predict_noise(pipe, torch.cat([x_in, x_in]), t, torch.cat([neg, cond])).chunk(2)
                    eps = eps_c if gs == 1.0 else eps_u + gs * (eps_c - eps_u)
                    if rescale and gs > 1.0:  # as diffusers: only where guidance amplifies
                        # one sample at a time: a batched std reduces in an order that depends on the batch,
                        # and a sample must not depend on what it was batched with (resumed runs, tests)
                        eps = torch.cat([rescale_noise_cfg(eps[k : k + 1], eps_c[k : k + 1], guidance_rescale=rescale)
                                         for k in range(len(eps))])
                else:
                    eps_c = predict_noise(pipe, x_in, t, cond)
                    eps_u, eps = eps_c, eps_c
                if return_noise_preds:
                    noise_preds[i].append(to_epsilon(sched, torch.stack([eps_u, eps_c]), x_in, t))
                latents = sched.step(eps, t, latents).prev_sample
                if callback is not None:
                    callback(i, int(t), latents)
            if stop_after is None:
                images.append(decode(pipe, latents))
    return GenerationOutput(
        images=torch.cat(images) if images else None,
        seeds=sidx,
        prompt_index=pidx,
        noise_preds=[torch.cat(p, dim=1) for p in noise_preds] if return_noise_preds else None,
        timesteps=[int(t) for t in timesteps],
    )
