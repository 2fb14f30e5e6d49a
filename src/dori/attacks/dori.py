"""DoRI: Discovery of Retained Images (Kowalczuk et al., arXiv 2507.16880, ICML 2026).

The attack optimizes the *text embedding* (the text encoder's output, 77 x D) so that the frozen,
possibly mitigated model denoises towards a target image, with the standard training loss::

    y   <- init (the memorized prompt's embedding | N(0, I) | another prompt's embedding)
    z0  <- latent of the target image (VAE encode * scaling factor; pixels for pixel models)
    for k in 1..K:                                   # K = 50
        draw B = 8 fresh (eps ~ N(0, I), t ~ U{t_min..t_max}) pairs
        z_t <- sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
        L   <- mean || eps - eps_theta(z_t, t, y) ||^2   # gradient w.r.t. y only (v-models: v target)
        y   <- Adam step (lr)

Several targets and restarts are optimized together: one batched UNet call per step. Model weights
are never modified (mitigations stay applied through their masks while the attack runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dori.models.generate import denoising_loss, encode, encode_prompts, unet_place


@dataclass
class AttackResult:
    """What an attack returns; shared by DoRI and the baselines.

    Attributes:
        trigger: ``N x 77 x D`` optimized embeddings (one per target and restart, target-major).
        init: the starting embeddings, same shape.
        target_index: which target image each trigger belongs to.
        loss: per step, the loss of each trigger (``steps x N``).
        distance: per step, ``||y - y0||_2`` of each trigger (``steps x N``).
        steps: steps run; seconds: wall time; params: the attack's parameters.
        snapshots: budget (steps) -> triggers after that many steps (``0`` = the initial embeddings).
        stopped_at: per trigger, the step at which early stopping froze it (None = ran to the end).
    """

    trigger: torch.Tensor
    init: torch.Tensor
    target_index: list[int]
    loss: list[list[float]] = field(default_factory=list)
    distance: list[list[float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    stopped_at: list[int | None] = field(default_factory=list)

    def at(self, budget: int) -> torch.Tensor:
        """Triggers after ``budget`` steps (a snapshot asked for at attack time)."""
        if budget not in self.snapshots:
            raise KeyError(f"no snapshot at {budget} steps; have {sorted(self.snapshots)}")
        return self.snapshots[budget]


class DoRI:
    """The DoRI embedding attack.

    Args:
        steps: Adam steps (paper: 50).
        lr: Adam learning rate (paper: 0.1 for SD v1.4's embedding scale).
        pairs: fresh (noise, timestep) pairs per step and trigger (paper: 8).
        t_range: timesteps drawn uniformly from ``[t_min, t_max)`` (default: all training timesteps).
        init: ``"prompt"`` (the given prompts' embeddings), ``"random"`` (``init_scale * N(0, I)``) or
            ``"embeds"`` (explicit embeddings passed to :meth:`attack`).
        init_scale: standard deviation of the random initialization.
        restarts: independent triggers per target (random inits differ per restart).
        positions: token positions to optimize (``None`` = all 77), e.g. only padding positions.
        t_weighting: ``"uniform"`` over ``t_range`` or ``"low"`` (probability falling linearly to 0 at
            ``t_max``: favours the low-noise steps where image detail is decided).
        check_every: with a ``check`` callable passed to :meth:`attack`, test the triggers every this many
            steps and freeze the ones that pass (early stop; off by default, as in the paper).

    Example:
        >>> res = DoRI(steps=50).attack(pipe, images, prompts=["chelsea the orange tabby cat looking up"])
        >>> out = generate(pipe, prompt_embeds=res.trigger, seeds=[0, 1])
    """

    name = "dori"

    def __init__(self, steps: int = 50, lr: float = 0.1, pairs: int = 8, t_range: tuple[int, int] | None = None,
                 init: str = "prompt", init_scale: float = 1.0, restarts: int = 1,
                 positions: list[int] | None = None, t_weighting: str = "uniform", check_every: int = 10):
        if init not in ("prompt", "random", "embeds"):
            raise ValueError(f"init must be 'prompt', 'random' or 'embeds', got {init!r}")
        if t_weighting not in ("uniform", "low"):
            raise ValueError(f"t_weighting must be 'uniform' or 'low', got {t_weighting!r}")
        if steps < 0 or pairs < 1 or restarts < 1 or check_every < 1:
            raise ValueError(f"steps must be >= 0, pairs, restarts and check_every >= 1; got steps={steps}, "
                             f"pairs={pairs}, restarts={restarts}, check_every={check_every}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.steps, self.lr, self.pairs, self.t_range = steps, lr, pairs, t_range
        self.init, self.init_scale, self.restarts, self.positions = init, init_scale, restarts, positions
        self.t_weighting, self.check_every = t_weighting, check_every

    def params(self) -> dict:
        return dict(steps=self.steps, lr=self.lr, pairs=self.pairs, t_range=self.t_range, init=self.init,
                    init_scale=self.init_scale, restarts=self.restarts, positions=self.positions,
                    t_weighting=self.t_weighting)

    def __repr__(self) -> str:
        return "DoRI(" + ", ".join(f"{k}={v}" for k, v in self.params().items()) + ")"

    def attack(self, pipe, images: torch.Tensor, prompts: list[str] | None = None,
               embeds: torch.Tensor | None = None, seed: int = 0, snapshots: tuple[int, ...] = (),
               check=None) -> AttackResult:
        """Optimize triggers for target ``images`` (``T x 3 x H x W`` in [0, 1]) against ``pipe`` as it is.

        Args:
            prompts / embeds: the initial embeddings' source for ``init="prompt"`` / ``"embeds"``.
            seed: seeds the (noise, timestep) draws and the random initialization.
            snapshots: budgets (step counts <= ``steps``) at which to keep a copy of the triggers.
            check: optional early stop, ``check(triggers, target_index) -> bool tensor``, called every
                ``check_every`` steps; triggers that pass are frozen, the loop ends when all have.
        """
        bad = [b for b in snapshots if not 0 <= b <= self.steps]
        if bad:
            raise ValueError(f"snapshot budgets {bad} are outside 0..{self.steps} steps")
        t0 = time.time()
        dev, dtype = unet_place(pipe)
        g = torch.Generator().manual_seed(seed)
        n_t = images.shape[0]
        idx = [i for i in range(n_t) for _ in range(self.restarts)]
        z0 = encode(pipe, images)
        with torch.no_grad():
            if self.init == "prompt":
                if prompts is None or len(prompts) != n_t:
                    raise ValueError("init='prompt' needs one prompt per target image")
                y0 = encode_prompts(pipe, prompts)[idx]
            elif self.init == "embeds":
                if embeds is None or embeds.shape[0] != n_t:
                    raise ValueError("init='embeds' needs one embedding per target image")
                y0 = embeds.to(dev, dtype)[idx]
            else:
                shape = (len(idx), pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
                y0 = (torch.randn(shape, generator=g) * self.init_scale).to(dev, dtype)
        y = y0.clone().requires_grad_(True)
        keep = None
        if self.positions is not None:
            keep = torch.zeros(1, y.shape[1], 1, device=dev, dtype=dtype)
            keep[:, self.positions] = 1
        opt = torch.optim.Adam([y], lr=self.lr)
        t_lo, t_hi = self.t_range or (0, pipe.scheduler.config.num_train_timesteps)
        t_prob = torch.ones(t_hi - t_lo) if self.t_weighting == "uniform" else torch.arange(t_hi - t_lo, 0, -1.0)
        z0_rep = z0[idx].repeat_interleave(self.pairs, dim=0)
        res = AttackResult(trigger=y0, init=y0.detach().clone(), target_index=idx, params=self.params(),
                           stopped_at=[None] * len(idx))
        frozen = torch.zeros(len(idx), dtype=torch.bool, device=dev)
        if 0 in snapshots:
            res.snapshots[0] = y0.detach().clone()
        for step in range(1, self.steps + 1):
            eps = torch.randn(z0_rep.shape, generator=g).to(dev, dtype)
            t = (t_lo + torch.multinomial(t_prob, z0_rep.shape[0], replacement=True, generator=g)).to(dev)
            # the training loss: target eps (SD 1.x) or v (SD 2.x-768), gradient to y only
            per = denoising_loss(pipe, z0_rep, eps, t, y.repeat_interleave(self.pairs, dim=0))
            per = per.view(len(idx), self.pairs).mean(1)
            opt.zero_grad(set_to_none=True)
            per.sum().backward()
            if keep is not None:
                y.grad.mul_(keep)
            before = y.detach()[frozen].clone()
            opt.step()
            with torch.no_grad():
                y[frozen] = before  # early-stopped triggers keep their value (Adam's momentum would move them)
            res.loss.append(per.detach().cpu().tolist())
            res.distance.append((y.detach() - y0).flatten(1).norm(dim=1).cpu().tolist())
            if step in snapshots:
                res.snapshots[step] = y.detach().clone()
            if check is not None and step % self.check_every == 0:
                passed = torch.as_tensor(check(y.detach(), idx), dtype=torch.bool, device=dev) & ~frozen
                for i in passed.nonzero().flatten().tolist():
                    res.stopped_at[i] = step
                frozen |= passed
                if bool(frozen.all()):
                    break
        res.trigger = y.detach()
        res.steps = step if self.steps else 0
        for b in snapshots:  # budgets beyond an early stop of every trigger: the frozen triggers
            res.snapshots.setdefault(b, res.trigger.clone())
        res.seconds = time.time() - t0
        return res
