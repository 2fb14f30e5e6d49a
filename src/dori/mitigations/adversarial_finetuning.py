"""Adversarial fine-tuning (Kowalczuk et al., arXiv 2507.16880, PAPER.md section 8): the mitigation that
does not assume the memorized image lives in a few weights.

    x~_i  <- surrogate of memorized image i: what the pruned model draws from its prompt p_i
    repeat for E epochs:
        y_i   <- fresh DoRI triggers of every memorized image against the CURRENT weights
        for S steps:
            L_adv <- training loss of x~_i conditioned on y_i or on p_i    # steer both to the surrogate
            L_DM  <- training loss on ordinary image-caption pairs         # keeps the model's utility
            Adam step on every UNet weight, on L_adv + L_DM

The paper's pseudo-code conditions L_adv on the triggers only; dori adds the original prompts (half of each
adversarial batch, the other half triggers) so that the prompt stops replicating too, as every other
mitigation's "original prompt" row asks. The paper leaves the learning rate, batch and number of triggers
open; dori's defaults are stated in :class:`AdversarialFineTuning` and docs/mitigations.md.

The loop changes ``pipe.unet`` in place (the caller keeps a copy, :func:`dori.analyses.finetune.run_finetune`
does); with ``checkpoints`` it writes the weights, Adam's state and the random state after each epoch and
resumes from the last one written, so a killed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dori.errors import DoriError
from dori.models.generate import denoising_loss, encode, encode_prompts
from dori.reports.results import write_json, write_safetensors

log = logging.getLogger(__name__)

# the attack seeds of training start here: an audit (`dori attack --attack-seed N`, N small) never replays
# the (noise, timestep) draws the fine-tuning was trained against
TRAINING_ATTACK_SEEDS = 1_000_000


@dataclass
class AdversarialFineTuning:
    """Parameters of the loop (module docstring). ``steps``: Adam steps per epoch; ``batch``: images per
    loss term and step; ``caption_dropout``: share of L_DM's captions replaced by the empty one, as in
    training (classifier-free guidance needs the unconditional prediction kept); ``group``: targets per
    batched DoRI call (the bypass benchmark's default: a GPU's memory bounds it on SD)."""

    epochs: int = 5
    steps: int = 50
    lr: float = 1e-4
    batch: int = 8
    caption_dropout: float = 0.1
    group: int = 4

    def __post_init__(self):
        for name, ok in (("epochs", self.epochs >= 1), ("steps", self.steps >= 1), ("lr", self.lr > 0),
                         ("batch", self.batch >= 2), ("caption_dropout", 0 <= self.caption_dropout <= 1),
                         ("group", self.group >= 1)):
            if not ok:
                raise DoriError(f"adversarial fine-tuning: {name}={getattr(self, name)!r} is out of range (epochs, "
                                "steps, group: 1 or more; batch: 2 or more, half triggers, half prompts; lr above 0; "
                                "caption_dropout in [0, 1])")

    def params(self) -> dict:
        return asdict(self)

    def run(self, pipe, targets: torch.Tensor, prompts: Sequence[str], surrogates: torch.Tensor,
            keep_images: torch.Tensor, keep_captions: Sequence[str], attack, seed: int = 0,
            checkpoints: str | Path | None = None, key: dict | None = None) -> list[dict]:
        """Fine-tune ``pipe.unet`` in place; return one record per epoch (DoRI's final loss on the fresh
        triggers, the mean L_adv and L_DM, seconds).

        Args:
            targets: ``T x 3 x H x W`` memorized images in [0, 1], the DoRI targets; ``prompts`` their captions.
            surrogates: ``T x 3 x H x W``, what each should become.
            keep_images / keep_captions: ordinary pairs for L_DM.
            attack: a :class:`~dori.attacks.dori.DoRI`; epoch ``e`` attacks with seed
                ``TRAINING_ATTACK_SEEDS + seed * 1000 + e``, draws no audit repeats (its ``--attack-seed`` are small).
            checkpoints: folder for the per-epoch checkpoints (None: none); ``key``: what they must have been
                made with to be resumed (the run's settings).
        """
        if not (len(targets) == len(prompts) == len(surrogates)) or not len(targets):
            raise DoriError("adversarial fine-tuning needs one caption and one surrogate per memorized target")
        if len(keep_images) != len(keep_captions) or not len(keep_images):
            raise DoriError("adversarial fine-tuning needs ordinary image-caption pairs to keep the model's utility")
        unet = pipe.unet
        params = [p for p in unet.parameters()]
        if any(p.dtype != torch.float32 for p in params):
            raise DoriError("adversarial fine-tuning trains in float32 (Adam's steps vanish in half precision): load "
                            "the model in float32")
        opt = torch.optim.Adam(params, lr=self.lr)
        g = torch.Generator().manual_seed(seed)
        z_sur = encode(pipe, surrogates)
        with torch.no_grad():
            y_prompt = encode_prompts(pipe, list(prompts))
            empty = encode_prompts(pipe, [""])
        n_train = pipe.scheduler.config.num_train_timesteps
        key = json.loads(json.dumps({"params": self.params(), "seed": seed, **(key or {})}, default=str))
        records = _resume(checkpoints, key, unet, opt, g) if checkpoints else []
        for epoch in tqdm(range(len(records), self.epochs), desc="adversarial fine-tuning", initial=len(records),
                          total=self.epochs):
            t0 = time.time()
            unet.requires_grad_(False)  # DoRI's gradient goes to the embedding only
            y_adv, owner, final = [], [], []
            for i in range(0, len(targets), self.group):  # a few targets per batched attack, as the benchmark's
                res = attack.attack(pipe, targets[i : i + self.group], prompts=list(prompts[i : i + self.group]),
                                    seed=TRAINING_ATTACK_SEEDS + seed * 1000 + epoch)
                y_adv.append(res.trigger.detach())
                owner += [i + t for t in res.target_index]
                final += [float(v) for v in (res.loss[-1] if res.loss else [])]
            y_adv, owner = torch.cat(y_adv), torch.tensor(owner)
            unet.requires_grad_(True)
            sums = {"adv": 0.0, "dm": 0.0}
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                half = self.batch // 2
                pick = torch.randint(0, len(y_adv), (half,), generator=g)
                own = torch.randint(0, len(y_prompt), (self.batch - half,), generator=g)
                cond = torch.cat([y_adv[pick], y_prompt[own]])
                clean = z_sur[torch.cat([owner[pick], own])]
                l_adv = self._loss(pipe, clean, cond, g, n_train)
                l_adv.backward()  # one graph at a time: half the activations held at once
                j = torch.randint(0, len(keep_images), (self.batch,), generator=g)
                drop = torch.rand(self.batch, generator=g) < self.caption_dropout
                with torch.no_grad():
                    cond_k = encode_prompts(pipe, [keep_captions[i] for i in j.tolist()])
                    cond_k[drop.to(cond_k.device)] = empty[0]
                l_dm = self._loss(pipe, encode(pipe, keep_images[j]), cond_k, g, n_train)
                l_dm.backward()
                opt.step()
                sums["adv"] += l_adv.item() / self.steps
                sums["dm"] += l_dm.item() / self.steps
            unet.requires_grad_(False)
            records.append({"epoch": epoch, "dori_final_loss": sum(final) / len(final) if final else None,
                            "loss_adv": sums["adv"], "loss_dm": sums["dm"], "seconds": round(time.time() - t0, 2)})
            log.info("epoch %d: DoRI loss %s, L_adv %.4f, L_DM %.4f", epoch, records[-1]["dori_final_loss"],
                     sums["adv"], sums["dm"])
            if checkpoints:
                _save(Path(checkpoints), key, records, unet, opt, g)
        opt.zero_grad(set_to_none=True)  # no gradient left on the model's weights
        return records

    @staticmethod
    def _loss(pipe, clean: torch.Tensor, cond: torch.Tensor, g: torch.Generator, n_train: int) -> torch.Tensor:
        dev = clean.device
        eps = torch.randn(clean.shape, generator=g).to(dev, clean.dtype)
        t = torch.randint(0, n_train, (clean.shape[0],), generator=g).to(dev)
        return denoising_loss(pipe, clean, eps, t, cond).mean()


CKPT = "last"


def _save(folder: Path, key: dict, records: list[dict], unet, opt, g: torch.Generator) -> None:
    """Weights, Adam's state and the random state after an epoch; the JSON, written last, marks it complete."""
    tensors = {f"unet.{n}": p.detach().cpu() for n, p in unet.named_parameters()}
    for i, state in opt.state_dict()["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v).detach().cpu() for k, v in state.items()}
    tensors["rng"] = g.get_state()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{CKPT}.json").unlink(missing_ok=True)  # the weights below are not yet those of the JSON's epoch
    write_safetensors(folder / f"{CKPT}.safetensors", tensors)
    write_json(folder / f"{CKPT}.json", {"key": key, "epochs": records})


def _resume(folder: str | Path, key: dict, unet, opt, g: torch.Generator) -> list[dict]:
    """The epochs a checkpoint made with ``key`` holds, its state loaded; [] when there is none."""
    from safetensors.torch import load_file

    js, st = Path(folder) / f"{CKPT}.json", Path(folder) / f"{CKPT}.safetensors"
    if not js.is_file() or not st.is_file():
        return []
    saved = json.loads(js.read_text())
    if saved.get("key") != key:
        log.warning("the checkpoint in %s was made with other settings: starting again from the model", folder)
        return []
    tensors = load_file(str(st))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            p.copy_(tensors[f"unet.{n}"])
    state = opt.state_dict()
    for i in range(len(state["param_groups"][0]["params"])):
        found = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
        if found:
            state["state"][i] = found
    opt.load_state_dict(state)
    g.set_state(tensors["rng"])
    log.info("resuming adversarial fine-tuning after epoch %d (%s)", len(saved["epochs"]) - 1, folder)
    return saved["epochs"]
