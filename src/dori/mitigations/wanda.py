"""Wanda pruning for memorization (Chavhan et al., "ConceptPrune", 2024; Wanda: Sun et al. 2023).

For a layer with weight ``W`` (out x in) and input activations ``X`` at sampling step t, the score of
weight ``W_ij`` is ``|W_ij| * ||X_j||_2`` (``X_j``: column j of the input over all token positions).
Scores are computed for the memorized prompt and for a base prompt (the empty string), each along its
own conditional sampling trajectory, over the first ``n_steps`` sampling steps. Per step and per output
row, the top ``sparsity`` fraction of columns by memorized score that also beat the base score are
selected; the mask is the union over steps; those weights are zeroed. Default layers: the second FFN
linear of every transformer block (``ffn-out``), as in the reference code.

Input-column norms are accumulated on the model's device inside the forward hook; nothing is copied to
the CPU per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dori.mitigations.masks import Mask
from dori.models.generate import encode_prompts, generate, one_embedding
from dori.models.layers import resolve_layers


class Wanda:
    """Wanda weight pruning for one memorized prompt. One verb: :meth:`localize` (prompt -> weight Mask).

    Args:
        layer_group: layers to prune (default ``ffn-out``: ``ff.net.2`` of every transformer block).
        sparsity: fraction of each row's weights selected per step (default 0.01; the DoRI paper also
            studies 0.10).
        n_steps: how many of the first sampling steps are unioned (10).
        base_prompt: the reference prompt (``""``).
        seeds: sampling seeds whose column norms are pooled (norms add up over seeds).
        num_inference_steps: the sampling schedule (default: the model's).
    """

    name = "wanda"

    def __init__(self, layer_group: str = "ffn-out", sparsity: float = 0.01, n_steps: int = 10,
                 base_prompt: str = "", seeds: Sequence[int] = (0,), num_inference_steps: int | None = None):
        if not 0 < sparsity <= 1:
            raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
        self.layer_group, self.sparsity, self.n_steps = layer_group, sparsity, n_steps
        self.base_prompt, self.seeds, self.num_inference_steps = base_prompt, tuple(seeds), num_inference_steps

    def params(self) -> dict:
        return dict(layer_group=self.layer_group, sparsity=self.sparsity, n_steps=self.n_steps,
                    base_prompt=self.base_prompt, seeds=list(self.seeds),
                    num_inference_steps=self.num_inference_steps)

    def __repr__(self) -> str:
        return "Wanda(" + ", ".join(f"{k}={v}" for k, v in self.params().items()) + ")"

    @torch.no_grad()
    def column_norms(self, pipe, prompt: str, embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per layer: ``steps x 2 x in_features`` input-column norms for (prompt, base prompt); with ``embeds``
        (``1 x 77 x D``, e.g. a DoRI trigger), for that embedding instead of the prompt's."""
        layers = resolve_layers(pipe.unet, self.layer_group)
        n_seeds = len(self.seeds)
        sq: dict[str, list[torch.Tensor]] = {ref.name: [] for ref in layers}

        def hook_for(name):
            def hook(module, args, output):
                x = args[0]  # B x tokens x in  (B = 2 prompts x seeds, prompt-major)
                s = x.float().pow(2).sum(dim=1).view(2, n_seeds, -1).sum(dim=1)
                sq[name].append(s)

            return hook

        handles = [ref.module.register_forward_hook(hook_for(ref.name)) for ref in layers]
        try:
            pair = encode_prompts(pipe, [prompt, self.base_prompt])
            if embeds is not None:
                pair = torch.cat([one_embedding(pipe, embeds), pair[1:]])
            generate(pipe, prompt_embeds=pair, seeds=self.seeds, guidance_scale=1.0,
                     stop_after=self.n_steps, num_inference_steps=self.num_inference_steps,
                     batch_size=2 * n_seeds)
        finally:
            for h in handles:
                h.remove()
        return {n: torch.stack(v).sqrt() for n, v in sq.items()}

    @torch.no_grad()
    def localize(self, pipe, prompt: str, embeds: torch.Tensor | None = None) -> Mask:
        """The weights to zero for one memorized prompt (or, with ``embeds``, for that embedding, e.g. a DoRI
        trigger; ``prompt`` then labels the mask)."""
        norms = self.column_norms(pipe, prompt, embeds)
        layers = {ref.name: ref.module for ref in resolve_layers(pipe.unet, self.layer_group)}
        out = {}
        for name, nrm in norms.items():
            w = layers[name].weight.detach().abs().float()
            k = max(1, math.ceil(self.sparsity * w.shape[1]))
            selected = torch.zeros_like(w, dtype=torch.bool)
            for step in range(nrm.shape[0]):
                s_mem, s_base = w * nrm[step, 0][None, :], w * nrm[step, 1][None, :]
                top = torch.zeros_like(selected).scatter_(1, s_mem.topk(k, dim=1).indices, True)
                selected |= top & (s_mem > s_base)
            out[name] = selected.flatten().nonzero().flatten().cpu()
        meta = dict(method="wanda", prompt=prompt, params=self.params(), model=getattr(pipe, "dori_name", None))
        return Mask("weight", out, meta)
