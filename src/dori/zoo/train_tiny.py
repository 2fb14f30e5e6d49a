"""The reproducible recipe of the embedded tiny model (``dori zoo train-tiny``).

Real Stable Diffusion classes at tiny size: a ``UNet2DConditionModel`` with cross-attention in down,
mid and up blocks (SD v1.x block types), a small ``CLIPTextModel`` trained with the UNet (SD freezes a
pretrained CLIP; a frozen random one binds text too weakly, see ``TrainConfig.train_text_encoder``)
behind the real CLIP BPE tokenizer, SD's noise schedule, and a pixel-space identity VAE.
Trained with SD 2.x-768's v-prediction loss (``prediction_type``; epsilon as SD 1.x is an option) and
10% caption dropout on :mod:`dori.zoo.tiny_data`, where the memorized photos are heavily duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dori.errors import DoriError
from dori.models.generate import training_target
from dori.models.loading import check_device
from dori.zoo.tiny_data import LAYOUTS, RESOLUTION, TinyDataSpec, build_train_set

log = logging.getLogger(__name__)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 48, 64, 64),
    # SD v1.x block types; no attention at full resolution (too slow on a CPU at 32x32).
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=2,  # diffusers' legacy name: this is the number of heads, as in SD's config
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    # SD's schedule. It leaves sqrt(abar_T) = 7% of the signal at t = T; NeMo's memorization signal
    # (the first-step noise difference) relies on exactly that. (A pixel-space DDPM schedule, 1e-4 to
    # 0.02, was tried: its near-zero terminal SNR erases the first-step signal and did not improve
    # sample quality on this model.)
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    # Pixel-space epsilon prediction needs x0 kept in range at sampling time.
    thresholding=True,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
)


# Per-model settings of the methods, written to dori_defaults.json ("methods"), chosen on the weights
# shipped until 2026-11-30 by the measurements below (docs/tiny-model.md; re-measure them for a model
# trained differently). NeMo's were kept since: on the weights shipped since 2026-12-04 (template share
# 0.8) NeMo gives MR 1.00 -> 0.09 (the astronaut in 3 of 4 seeds; signal floor 0.24-0.49).
# - NeMo: all 10 value projections (SD's 7 down/mid ones hold SD's memorized images; here the up blocks
#   also carry the astronaut: MR 1.00 with the 4 down/mid ones off, 0.00 with all 10), threshold 0.5
#   (NeMo: 0.428 on SD v1.4; the floor with all 10 off is 0.27-0.50 here), a pairwise threshold of 0.3
#   below all but one memorized caption's seed consistency, and the initial search's z-score floor
#   lowered from 1 to 0 (the reference's `--min_theta`): at 1 the search ends above the threshold for
#   the cameraman (signal 0.62, MR 1.00 after refinement) though its floor is 0.42; at 0 it reaches 0.46
#   (MR 0.00). Prompts that reach the threshold earlier are not affected.
# - Wanda: the reference's layers (the second FFN linear of every block), 11% of each row: the smallest
#   sparsity that brings MR to at most 0.125 (one caption's worth of 8), read at 10, 11, 12, 14, 16, 18%
#   (`benchmarks/wanda_sweep.py ffn-out:0.1 ffn-out:0.11 ... ffn-out:0.18`, plus 0.01/0.2/0.3, on the
#   shipped weights: 1% 1.00, 10% 0.16, 11% 0.12, 12/14/16/18/20/30% 0.09). Until 2026-12-04 the grid was
#   1/10/20/30% and picked 20%; the finer grid was run after Wanda + DoRI at 20% had been measured
#   (docs/attacks.md has both). The value projections at 20-50% reach a similar MR but change non-memorized
#   generations about twice as much (docs/mitigations.md).
METHOD_DEFAULTS = {
    "nemo": {"layer_group": "value", "threshold": 0.5, "pairwise_threshold": 0.3, "theta_min": 0.0},
    "wanda": {"layer_group": "ffn-out", "sparsity": 0.11},
}


@dataclass
class TrainConfig:
    out: str
    steps: int = 4500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    # Train the CLIP text encoder with the UNet. SD freezes a *pretrained* CLIP; a frozen *random* one
    # binds text to images too weakly (unseen captions regurgitated memorized photos, procedural
    # captions missed their colour and shape), so the tiny model learns its own.
    train_text_encoder: bool = True
    # PyTorch's fused CPU/CUDA AdamW: the optimizer step ~5x faster (about 10% of a CPU recipe step),
    # but a different float order, so it does not reproduce the shipped weights (trained without it).
    fused_optimizer: bool = False
    # Keep an exponential moving average of the weights (decay per step; diffusers' EMAModel) and save
    # it instead of the last weights, as diffusion training usually does. None: off.
    ema_decay: float | None = None
    seed: int = 0
    threads: int = 2
    # Where to train ("cpu", "cuda", "cuda:1"). Every random draw stays on the CPU generator, so a GPU
    # run sees the same batches, noise and timesteps; its float order differs, so its weights do too.
    device: str = "cpu"
    # Sampling defaults written to dori_defaults.json. SD's 7.5 guidance ruins a model this small. Plain
    # guidance above 1 speckles this model's memorized copies (the coffee cup: pixel-ssim 0.82 at 1.0,
    # 0.45 at 2.0), but without guidance DoRI through Wanda falls to 0.38 at 50 steps (0.84 at plain 2.0,
    # 0.72 at 2.0 with rescale 0.5). So the
    # model keeps classifier-free guidance, as SD is used and attacked, with diffusers' guidance rescale
    # (Lin et al. 2023, made for v-prediction models; `guidance_rescale` of SD pipelines), which removes
    # the speckle (coffee 0.64-0.71 at 2.0 with rescale 0.5; docs/tiny-model.md).
    sample_steps: int = 25
    guidance_scale: float = 2.0
    guidance_rescale: float = 0.5
    # Latents = pixels in [-1, 1] times this (the pixel VAE's scaling_factor). 1.0 is the shipped model;
    # 2.0 gives about unit variance, as SD's latent scaling does (tried for NeMo's first-step signal:
    # it memorizes as well and does not lower NeMo's floor, docs/tiny-model.md). The method settings
    # written with it (METHOD_DEFAULTS) were measured at 1.0: re-measure them for another scale.
    latent_scale: float = 1.0
    # "epsilon" (SD 1.x) or "v_prediction" (SD 2.x-768): what the UNet learns to predict. The shipped
    # model predicts v: its first-step noise prediction is then exact enough for NeMo's signal (an
    # epsilon model this small misses the first step's noise by more than the memorized photo's share
    # of it, docs/tiny-model.md).
    prediction_type: str = "v_prediction"
    data: TinyDataSpec = field(default_factory=TinyDataSpec)

    def check(self) -> None:
        """One clear error for a recipe that cannot train, before anything is built."""
        d = self.data
        bad = [(f"{name} must be {rule}, got {value}") for name, value, ok, rule in [
            ("steps", self.steps, self.steps >= 1, "1 or more"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "1 or more"),
            ("lr", self.lr, self.lr > 0, "positive"),
            ("warmup", self.warmup, self.warmup >= 0, "0 or more"),
            ("caption_dropout", self.caption_dropout, 0 <= self.caption_dropout <= 1, "in [0, 1]"),
            ("threads", self.threads, self.threads >= 1, "1 or more"),
            ("procedural_layout", d.procedural_layout, d.procedural_layout in LAYOUTS, f"one of {', '.join(LAYOUTS)}"),
            ("latent_scale", self.latent_scale, self.latent_scale > 0, "positive"),
            ("ema_decay", self.ema_decay, self.ema_decay is None or 0 <= self.ema_decay < 1, "in [0, 1) or None (off)"),
            ("prediction_type", self.prediction_type, self.prediction_type in ("epsilon", "v_prediction"),
             "epsilon or v_prediction"),
            ("duplicates", d.duplicates, d.duplicates >= 0, "0 or more"),
            ("n_procedural", d.n_procedural, d.n_procedural >= 0, "0 or more"),
            ("crop_extra_words", d.crop_extra_words, d.crop_extra_words >= 0, "0 or more"),
            ("crop_template_captions", d.crop_template_captions, 0 <= d.crop_template_captions <= 1, "in [0, 1]"),
        ] if not ok]
        if (d.crop_extra_words or d.crop_template_captions) and not self.train_text_encoder:
            bad.append("crop_extra_words and crop_template_captions need train_text_encoder=True (the captions "
                       "change at every draw)")
        if bad:
            raise DoriError("the recipe cannot train: " + "; ".join(bad))


def build_tiny_components(bpe_tokenizer_dir: str | Path, seed: int = 0, latent_scale: float = 1.0,
                          prediction_type: str = "v_prediction"):
    """Untrained tiny pipeline components. The tokenizer folder holds CLIP's vocab.json/merges.txt."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dori.models.pixel_vae import PixelIdentityVAE

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    tokenizer = CLIPTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    return dict(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=PixelIdentityVAE(sample_size=RESOLUTION, scaling_factor=latent_scale),
        scheduler=DDIMScheduler(**scheduler_config(latent_scale, prediction_type)),
    )


def scheduler_config(latent_scale: float = 1.0, prediction_type: str = "v_prediction") -> dict:
    """The sampling scheduler's settings for latents of ``latent_scale``. diffusers' dynamic thresholding
    rescales x0 into [-1, 1], so scaled latents clip x0 to [-scale, scale] instead."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    cfg = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    if latent_scale == 1.0:
        return cfg
    return {**cfg, "thresholding": False, "clip_sample": True, "clip_sample_range": latent_scale}


def _token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as SD pads its prompts."""
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@torch.no_grad()
def _encode(tokenizer, text_encoder, captions: list[str], chunk: int = 256) -> torch.Tensor:
    return torch.cat([text_encoder(_token_ids(tokenizer, captions[i : i + chunk]))[0]
                      for i in range(0, len(captions), chunk)])


def train_tiny(cfg: TrainConfig, tokenizer_dir: str | Path | None = None) -> Path:
    """Train the tiny model from scratch and save a diffusers pipeline folder at ``cfg.out``.

    Args:
        cfg: recipe parameters (the defaults reproduce the shipped model).
        tokenizer_dir: folder with CLIP's tokenizer files; default: the shipped model's tokenizer.

    Returns:
        The output folder, loadable with ``dori.load_pipeline(path)``, or with diffusers' ``from_pretrained``
        after ``import dori.models.pixel_vae``.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    from dori.models.loading import TINY_PATH

    cfg.check()  # before the training set is built
    check_device(cfg.device)
    out = Path(cfg.out).expanduser().absolute()  # replaced at the end: refuse now what could not be, or is not ours
    if not out.name or out.is_symlink():
        raise DoriError(f"--out {cfg.out} is {'a link' if out.name else 'the root'}: give a folder for the model")
    if out.is_dir() and not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        raise DoriError(f"--out {out} is a folder you cannot read or write: give a folder for the model")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "dori_recipe.json").is_file())):
        raise DoriError(f"--out {out} exists and is not a tiny model this recipe wrote (no dori_recipe.json): it "
                        "would be replaced when training ends; give a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoriError(f"cannot write the model next to {out}: {e.strerror} ({e.filename})") from None
    if not os.access(out.parent, os.W_OK):
        raise DoriError(f"cannot write the model in {out.parent}: give --out in a folder you can write")
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else TINY_PATH / "tokenizer"
    comps = build_tiny_components(tokenizer_dir, cfg.seed, cfg.latent_scale, cfg.prediction_type)
    unet, te, tok = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    unet.set_attn_processor(AttnProcessor())  # few small heads: the classic processor is faster on CPU

    data = build_train_set(cfg.data)
    n_extra, p_template = cfg.data.crop_extra_words, cfg.data.crop_template_captions
    recaption = bool(n_extra or p_template)
    if recaption:
        from dori.zoo.tiny_data import frequent_words, swap_words, with_random_words

        vocab = frequent_words(tok, cfg.data.crop_vocabulary)
        g_words = torch.Generator().manual_seed(cfg.seed + 7)  # its own stream: the batches stay the same

        def crop_caption(row: int) -> str:
            cap = data.captions[row]
            if p_template and float(torch.rand(1, generator=g_words)) < p_template:
                template = int(torch.multinomial(data.weights, 1, generator=g_words))
                cap = swap_words(data.captions[template], vocab, cfg.data.template_swap, g_words)
            return with_random_words(cap, vocab, n_extra, g_words) if n_extra else cap
    log.info("training set: %d distinct pairs, %.0f with duplicates", len(data.captions), data.weights.sum())
    ids, empty_ids = _token_ids(tok, data.captions), _token_ids(tok, [""])
    if not cfg.train_text_encoder:
        embeds, empty = _encode(tok, te, data.captions), _encode(tok, te, [""])
    dev = torch.device(cfg.device)
    unet.to(dev)
    te.to(dev)
    ids, empty_ids = ids.to(dev), empty_ids.to(dev)
    if not cfg.train_text_encoder:
        embeds, empty = embeds.to(dev), empty.to(dev)
    images = ((data.images * 2 - 1) * cfg.latent_scale).to(dev)  # the VAE slot is the identity: latents = pixels

    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config(1.0, cfg.prediction_type).items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    abar = noise_sched.alphas_cumprod.to(dev)
    g = torch.Generator().manual_seed(cfg.seed)
    params = list(unet.parameters())
    if cfg.train_text_encoder:
        te.train().requires_grad_(True)
        params += list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=cfg.fused_optimizer or None)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    weights_ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        weights_ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)
    unet.train()
    bar = tqdm(range(cfg.steps), desc="train tiny", mininterval=5)
    ema = None
    for _step in bar:
        idx = torch.multinomial(data.weights, cfg.batch_size, replacement=True, generator=g).to(dev)
        x0 = images[idx]
        drop = (torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout).to(dev)
        if cfg.train_text_encoder:
            batch_ids = ids[idx]
            rows = data.random_crop[idx.cpu()].nonzero().flatten() if recaption else []
            if len(rows):
                caps = [crop_caption(int(idx[j])) for j in rows.tolist()]
                batch_ids[rows.to(dev)] = _token_ids(tok, caps).to(dev)
            cond = te(torch.where(drop[:, None], empty_ids, batch_ids))[0]
        else:
            cond = embeds[idx].clone()
            cond[drop] = empty
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=g).to(dev)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, cond).sample, training_target(noise_sched, x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if weights_ema is not None:
            weights_ema.step(params)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)

    if weights_ema is not None:
        weights_ema.copy_to(params)
    unet.eval().to("cpu")
    te.eval().requires_grad_(False).to("cpu")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())  # save with diffusers' default processor
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # ship the tokenizer as CLIP's vocab.json + merges.txt (1.5 MB) rather than a 3.6 MB tokenizer.json
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    recipe = asdict(cfg)
    recipe.update(train_seconds=round(time.time() - t_start, 1), final_loss_ema=ema,
                  torch=torch.__version__, n_pairs=len(data.captions))
    defaults = {"num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
                "guidance_rescale": cfg.guidance_rescale, "resolution": RESOLUTION, "methods": METHOD_DEFAULTS}
    (tmp / "dori_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (tmp / "dori_recipe.json").write_text(json.dumps(recipe, indent=2, default=list))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("saved tiny model to %s in %.0f s", out, time.time() - t_start)
    return out
