"""NeMo: localizing memorization neurons (Hintersdorf et al., "Finding NeMo", NeurIPS 2024).

A neuron is an output channel of a cross-attention value projection (``attn2.to_v``) of the down and
mid blocks (layer group ``nemo-value``; SD v1.4's layers 1-7). The procedure, per memorized prompt:

1. **Statistics** (once per model): for many non-memorized prompts, the activation of each neuron,
   ``mean over tokens of |to_v(e)|``, computed from the text embedding alone (no UNet run); its mean
   and std per neuron. Cached as safetensors, keyed by model, layer group and prompts.
2. **Memorization signal**: the first-step noise difference ``eps(x_T, e) - x_T`` (conditional
   prediction, per channel min-max scaled) for ``n_seeds`` initial noises. A prompt is memorized when
   the noise differences of different seeds look alike (max pairwise SSIM > ``pairwise_threshold``;
   NeMo's 0.428 on SD v1.4); only those seeds are looked at. With neurons deactivated, the signal is the
   max over looked-at seeds of SSIM(vanilla difference, blocked difference): the mitigation works once
   it drops below ``threshold``.
3. **Initial selection**: neurons whose activation z-score exceeds theta (from 5, lowered by 0.25 per
   round down to ``theta_min``, 1 in the reference) plus the top-k activations per layer (k from 0, +1
   per round), until the signal drops below ``threshold``. When the search ends above the threshold,
   the refinement keeps the signal below the last one reached (as the reference).
4. **Refinement**: try re-enabling whole layers (last to first), then single neurons; keep a neuron
   deactivated only if re-enabling it brings the signal back above the threshold.

Reachability check (not in the reference code): before the search, the signal is measured once with
every neuron of the layer group deactivated. When even this floor is above ``threshold``, the
threshold almost surely does not suit the model; NeMo warns and records ``signal_floor`` and
``threshold_reachable`` in the mask's metadata (the search still runs as published). On the tiny
32x32 epsilon model the floor was 0.83-0.97; on the shipped v-prediction one it is 0.27-0.50 with all 10
value projections (docs/tiny-model.md).

Speed-up over the reference code (which checks one candidate per UNet call and runs a UNet pass just to
read text-only activations): candidate checks can be batched, many candidate masks in one UNet call, one
mask per sample (``batch_candidates``; off by default: it did not pay on either device, see its
argument). The greedy decisions are replayed in order, so the selected set equals the sequential
procedure's up to float rounding; checks evaluated after an accepted candidate in the same batch are
recomputed under the new state and counted in ``stats["speculative"]``.
And every check reuses the accepted state's forward up to the first layer whose mask it changes
(:class:`dori.models.replay.PrefixReplay`), computing only the rest of the UNet: a check of a late
layer recomputes little, one of the first layer almost everything. The replay keeps the selection
exact on every device (on CUDA tested for two captions); batching does so on the CPU only (both
tested against ``batch_candidates=1, reuse_prefix=False``, the reference's one full UNet call per
check). ``stats["replayed_units"]`` counts the module calls replayed instead of computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from dori.errors import DoriError
from dori.mitigations.masks import Mask, per_sample_neuron_masks
from dori.models.generate import encode_prompts, generate, initial_noise, one_embedding
from dori.models.layers import resolve_layers
from dori.models.loading import modules_fingerprint
from dori.models.replay import PrefixReplay
from dori.reports.results import cache_dir, write_safetensors

log = logging.getLogger(__name__)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair SSIM of noise differences: NeMo's 3-scale MS-SSIM (kernel 11) when the latent is large
    enough (SD: 64 x 64), else single-scale SSIM with a 7 x 7 window (the tiny model's 32 x 32)."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as ms_ssim,
    )
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    a, b = a.float(), b.float()
    if min(a.shape[-2:]) > 40:
        return ms_ssim(a, b, reduction="none", kernel_size=11, betas=(0.33, 0.33, 0.33), data_range=1.0)
    return ssim(a, b, reduction="none", kernel_size=7, data_range=1.0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


@dataclass
class NeMoResult:
    mask: Mask
    memorized: bool
    initial: dict[str, list[int]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class NeMo:
    """NeMo neuron localization. One verb: :meth:`localize` (prompt -> neuron :class:`Mask`).

    Args:
        layer_group: the value layers searched (default ``nemo-value``).
        theta: initial z-score threshold (5), lowered by ``theta_step`` (0.25) per round to ``theta_min`` (1).
        k: initial top-k per layer (0), +1 per round.
        threshold: signal threshold of the initial selection and refinement (NeMo: 0.428 on SD v1.4;
            calibrate it for another model, see :func:`calibrate_nemo_threshold`).
        pairwise_threshold: max pairwise SSIM above which a seed counts as memorized (default: ``threshold``).
        n_seeds, seed: initial noises ``seed .. seed + n_seeds - 1`` (NeMo: 10 seeds).
        batch_candidates: candidate masks checked per UNet call (default 1, the reference's order).
            Batching did not pay on the tiny model (``benchmarks/nemo_batched.py``, prefix replay in both):
            on 2 CPU cores the UNet's cost grows with the batch and the checks a batch evaluates after an
            accepted one are wasted (0.20x the reference procedure's speed); on an H200 batches of 16
            ran at 1.28x, one check per call at 1.41x. On CUDA, a batch's size also changes the float
            rounding, so a check near the threshold can flip (5 of 8 captions differed by 1-4 neurons).
        reuse_prefix: reuse the accepted state's forward up to the first changed layer (exact; off: one
            full UNet forward per check, as the reference code).
        stats_cache: folder for the activation statistics (default ``$DORI_CACHE`` or ``~/.cache/dori``).
    """

    name = "nemo"

    def __init__(self, layer_group: str = "nemo-value", theta: float = 5.0, theta_step: float = 0.25,
                 theta_min: float = 1.0, k: int = 0, threshold: float = 0.428,
                 pairwise_threshold: float | None = None, n_seeds: int = 10, seed: int = 1,
                 batch_candidates: int = 1, reuse_prefix: bool = True,
                 stats_cache: str | Path | None = None):
        self.layer_group, self.theta0, self.theta_step, self.theta_min, self.k0 = (
            layer_group, theta, theta_step, theta_min, k)
        self.threshold = threshold
        self.pairwise_threshold = threshold if pairwise_threshold is None else pairwise_threshold
        self.seeds = list(range(seed, seed + n_seeds))
        self.batch_candidates = max(1, batch_candidates or 1)
        self.reuse_prefix = reuse_prefix
        self._replay: PrefixReplay | None = None
        self._replay_selection: dict[str, list[int]] | None = None  # the selection of the replay's state
        self.stats_cache = Path(stats_cache or cache_dir())
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._calls = self._checks = self._speculative = 0
        self.stats_key: str | None = None  # which statistics (model, layers, prompts, weights) are fitted
        self._refs: tuple[torch.nn.Module, list] | None = None  # (UNet, its layers of the group): resolved once

    def _layers(self, pipe) -> list:
        if self._refs is None or self._refs[0] is not pipe.unet:
            self._refs = (pipe.unet, resolve_layers(pipe.unet, self.layer_group))
        return self._refs[1]

    def params(self) -> dict:
        return dict(layer_group=self.layer_group, theta=self.theta0, theta_step=self.theta_step,
                    theta_min=self.theta_min, k=self.k0, threshold=self.threshold,
                    pairwise_threshold=self.pairwise_threshold, seeds=self.seeds, statistics=self.stats_key,
                    # batching can flip a check near the threshold on CUDA: a batched mask is another mask
                    **({"batch_candidates": self.batch_candidates} if self.batch_candidates > 1 else {}))

    def __repr__(self) -> str:
        return "NeMo(" + ", ".join(f"{k}={v}" for k, v in self.params().items()) + ")"

    # ---- 1. statistics -------------------------------------------------------------------------
    @torch.no_grad()
    def activations(self, pipe, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mean over tokens of |to_v(e)|`` per layer: ``P x neurons`` (text embedding only, no UNet)."""
        return {ref.name: ref.module(prompt_embeds).abs().mean(dim=1) for ref in self._layers(pipe)}

    def fit_statistics(self, pipe, prompts: Sequence[str], batch_size: int = 256) -> dict:
        """Mean and std of every neuron's activation over non-memorized ``prompts`` (cached on disk)."""
        # the text encoder and the layers, hashed now: retraining or a weight mask in place changes the key
        weights = modules_fingerprint([pipe.text_encoder, *(r.module for r in self._layers(pipe))])
        key = hashlib.sha1(json.dumps([getattr(pipe, "dori_name", "?"), self.layer_group, list(prompts),
                                       weights]).encode()).hexdigest()[:16]
        path = self.stats_cache / "nemo_stats" / f"{key}.safetensors"
        self.stats_key = key
        if path.is_file():
            t = load_file(str(path))
            names = json.loads(t.pop("__names__").numpy().tobytes().decode())
            self._stats = {n: (t[f"mean{i}"], t[f"std{i}"]) for i, n in enumerate(names)}
            return self._stats
        acts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(prompts), batch_size):
            for n, a in self.activations(pipe, encode_prompts(pipe, prompts[i : i + batch_size])).items():
                acts.setdefault(n, []).append(a)
        self._stats = {n: (torch.cat(a).mean(0), torch.cat(a).std(0)) for n, a in acts.items()}
        names = list(self._stats)
        tensors = {f"mean{i}": self._stats[n][0].cpu() for i, n in enumerate(names)}
        tensors |= {f"std{i}": self._stats[n][1].cpu() for i, n in enumerate(names)}
        tensors["__names__"] = torch.frombuffer(bytearray(json.dumps(names).encode()), dtype=torch.uint8)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, tensors)
        except OSError as e:  # computed again next time; nothing else changes
            log.warning("could not write NeMo's statistics to dori's cache (%s); set DORI_CACHE to a writable "
                        "folder", e)
        return self._stats

    # ---- 2. memorization signal ------------------------------------------------------------------
    @torch.no_grad()
    def noise_diffs(self, pipe, embeds: torch.Tensor, seeds: Sequence[int],
                    masks: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """Scaled first-step noise differences ``C x S x c x h x w`` for C candidate masks (or none)."""
        n_cand = len(masks) if masks else 1
        e = embeds.expand(n_cand, -1, -1)
        ctx = per_sample_neuron_masks(pipe.unet, _stack_masks(masks, len(seeds))) if masks else nullcontext()
        with ctx:
            out = generate(pipe, prompt_embeds=e, seeds=seeds, guidance_scale=1.0, stop_after=1,
                           return_noise_preds=True, batch_size=n_cand * len(seeds))
        eps = out.noise_preds[0][1]
        x_t = initial_noise(pipe, seeds).repeat(n_cand, 1, 1, 1)
        return _minmax(eps - x_t).view(n_cand, len(seeds), *eps.shape[1:])

    def _signal(self, pipe, embeds, vanilla, seeds, candidates: list[dict[str, list[int]]]) -> list[float]:
        masks = [self._bool_masks(pipe, c) for c in candidates]
        if self._replay is None:
            diffs = self.noise_diffs(pipe, embeds, seeds, masks)
        else:
            with self._replay.session(self._changed_layers(candidates), repeat=len(candidates)):
                diffs = self.noise_diffs(pipe, embeds, seeds, masks)
        self._calls += 1
        self._checks += len(candidates)
        out = []
        for d in diffs:
            out.append(float(_ssim(vanilla, d).max()))
        return out

    def _changed_layers(self, candidates: list[dict[str, list[int]]]) -> set[str] | None:
        """The layers where any candidate's neurons differ from the replay state's (None: no state)."""
        base = self._replay_selection
        if base is None:
            return None
        return {n for c in candidates for n in set(c) | set(base) if set(c.get(n, ())) != set(base.get(n, ()))}

    def _adopt(self, candidates: list[dict[str, list[int]]], j: int) -> dict[str, list[int]]:
        """Candidate ``j`` of the last check is the new selection (and the replay state)."""
        if self._replay is not None:
            self._replay.adopt(j, len(candidates))
            self._replay_selection = candidates[j]
        return candidates[j]

    def _bool_masks(self, pipe, sel: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        out = {}
        for ref in self._layers(pipe):
            m = torch.zeros(ref.module.out_features, dtype=torch.bool)
            idx = sel.get(ref.name, [])
            if len(idx):
                m[torch.as_tensor(idx)] = True
            out[ref.name] = m
        return out

    # ---- 3 + 4. localization --------------------------------------------------------------------
    def localize(self, pipe, prompt: str, stats_prompts: Sequence[str] | None = None,
                 embeds: torch.Tensor | None = None) -> NeMoResult:
        """Find the neurons to deactivate for one memorized prompt. With ``embeds`` (``1 x 77 x D``, e.g. a
        DoRI trigger) the search starts from that embedding instead of the prompt's; ``prompt`` labels it."""
        if self._stats is None:
            if stats_prompts is None:
                raise ValueError("NeMo needs activation statistics: call fit_statistics(pipe, prompts) first "
                                 "or pass stats_prompts (non-memorized prompts)")
            self.fit_statistics(pipe, stats_prompts)
        names = [ref.name for ref in self._layers(pipe)]
        with PrefixReplay(pipe.unet, names) if self.reuse_prefix else nullcontext() as replay:
            self._replay, self._replay_selection = replay, None
            try:
                return self._localize(pipe, prompt, embeds)
            finally:
                self._replay = self._replay_selection = None

    def _localize(self, pipe, prompt: str, embeds: torch.Tensor | None) -> NeMoResult:
        self._calls, self._checks, self._speculative = 0, 0, 0
        embeds = encode_prompts(pipe, [prompt]) if embeds is None else one_embedding(pipe, embeds)
        vanilla_all = self.noise_diffs(pipe, embeds, self.seeds)[0]
        self._calls += 1
        max_pair = _max_pairwise(vanilla_all)
        looked = [s for s, v in zip(self.seeds, max_pair.tolist(), strict=True) if v > self.pairwise_threshold]
        meta = dict(method="nemo", prompt=prompt, params=self.params(), model=getattr(pipe, "dori_name", None),
                    max_pairwise_ssim=max_pair.tolist())
        if not looked:
            return NeMoResult(Mask("neuron", {}, meta | {"memorized": False}), False,
                              stats=dict(unet_calls=self._calls))
        vanilla = vanilla_all[[self.seeds.index(s) for s in looked]]
        acts = {n: a[0] for n, a in self.activations(pipe, embeds).items()}
        floor = self.signal_floor(pipe, embeds, vanilla, looked)
        if floor > self.threshold:
            log.warning("NeMo: %r: the signal stays at %.3f with every neuron of %r deactivated, above the "
                        "threshold %.3f: the threshold is almost surely out of reach on this model and the "
                        "search will run to its floor. Calibrate the threshold for this model or search a "
                        "larger layer group.",
                        prompt[:60], floor, self.layer_group, self.threshold)

        # 3. initial selection: rounds (theta_r, k_r) are fixed in advance, so a batch of rounds is exact
        # (as the reference code: a failed round lowers theta and raises k; the search stops, without
        # evaluating it, at the round where theta reaches theta_min or k reaches the layer width)
        rounds, theta, k = [(self.theta0, self.k0)], self.theta0, self.k0
        max_k = max(a.numel() for a in acts.values())
        while True:
            theta, k = max(self.theta_min, theta - self.theta_step), k + 1
            if theta <= self.theta_min or k >= max_k:
                break
            rounds.append((theta, k))
        selection, signal, refine_thr = None, None, self.threshold
        for start in range(0, len(rounds), self.batch_candidates):
            batch = rounds[start : start + self.batch_candidates]
            cands = [self._initial(acts, th, kk) for th, kk in batch]
            sigs = self._signal(pipe, embeds, vanilla, looked, cands)
            hit = next((j for j, s in enumerate(sigs) if s <= self.threshold), None)
            if hit is not None:
                selection, signal = self._adopt(cands, hit), sigs[hit]
                self._speculative += len(batch) - hit - 1
                break
        if selection is None:  # floor reached: refine against the last signal reached (as the reference)
            selection, signal = self._adopt(cands, len(cands) - 1), sigs[-1]
            refine_thr = signal
        initial = {n: list(v) for n, v in selection.items()}
        initial_signal = signal

        # 4. refinement: layers last to first, then single neurons, greedy in order
        names = [n for n in reversed(list(selection)) if selection[n]]
        selection = self._greedy(pipe, embeds, vanilla, looked, selection, [(n, None) for n in names], refine_thr)
        neuron_cands = [(n, i) for n in reversed(list(selection)) for i in selection[n]]
        selection = self._greedy(pipe, embeds, vanilla, looked, selection, neuron_cands, refine_thr)
        final_signal = self._signal(pipe, embeds, vanilla, looked, [selection])[0]
        stats = dict(unet_calls=self._calls, candidate_checks=self._checks, speculative=self._speculative,
                     replayed_units=self._replay.replayed if self._replay is not None else 0,
                     initial_signal=initial_signal, final_signal=final_signal, refine_threshold=refine_thr,
                     signal_floor=floor, threshold_reachable=floor <= self.threshold,
                     looked_at_seeds=looked, n_initial=sum(map(len, initial.values())),
                     n_final=sum(map(len, selection.values())))
        mask = Mask("neuron", {n: v for n, v in selection.items() if v}, meta | {"memorized": True, **stats})
        return NeMoResult(mask, True, initial, stats)

    def signal_floor(self, pipe, embeds, vanilla, looked) -> float:
        """The signal with *every* neuron of the layer group deactivated (one UNet call). When even that
        stays above ``threshold``, the threshold almost surely does not suit the model."""
        full = {ref.name: list(range(ref.module.out_features)) for ref in self._layers(pipe)}
        return self._signal(pipe, embeds, vanilla, looked, [full])[0]

    def _initial(self, acts: dict[str, torch.Tensor], theta: float, k: int) -> dict[str, list[int]]:
        sel = {}
        for n, a in acts.items():
            mean, std = self._stats[n]
            z = (a.cpu() - mean.cpu()).abs() / std.cpu().clamp_min(1e-12)
            idx = set((z > theta).nonzero().flatten().tolist())
            if k > 0:
                idx |= set(a.topk(min(k, a.numel())).indices.tolist())
            sel[n] = sorted(idx)
        return sel

    def _greedy(self, pipe, embeds, vanilla, looked, selection, candidates, thr) -> dict[str, list[int]]:
        """Try removing each candidate (a whole layer if index is None) in order; keep the removal when
        the signal stays below ``thr``. Batched speculation, replayed in order (the sequential decisions,
        up to the float rounding a batch's size changes on CUDA)."""
        sel = {n: list(v) for n, v in selection.items()}
        i = 0
        while i < len(candidates):
            batch = candidates[i : i + self.batch_candidates]
            trials = [_without(sel, c) for c in batch]
            sigs = self._signal(pipe, embeds, vanilla, looked, trials)
            hit = next((j for j, s in enumerate(sigs) if s < thr), None)
            if hit is None:
                i += len(batch)
            else:
                sel = self._adopt(trials, hit)
                self._speculative += len(batch) - hit - 1
                i += hit + 1
        return sel


def _without(sel: dict[str, list[int]], cand: tuple[str, int | None]) -> dict[str, list[int]]:
    name, idx = cand
    out = {n: list(v) for n, v in sel.items()}
    out[name] = [] if idx is None else [j for j in out[name] if j != idx]
    return out


def _stack_masks(masks: list[dict[str, torch.Tensor]], repeat: int) -> dict[str, torch.Tensor]:
    """Candidate masks -> per-sample masks in generate()'s prompt-major order (candidate, seed)."""
    return {n: torch.stack([m[n] for m in masks]).repeat_interleave(repeat, dim=0) for n in masks[0]}


@torch.no_grad()
def max_pairwise_ssim(pipe, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    """NeMo's detection signal per prompt: max over seed pairs of SSIM between scaled first-step noise
    differences (``P`` values). Memorized prompts give near-identical differences across seeds."""
    nemo = NeMo(n_seeds=len(seeds), seed=seeds[0])
    out = []
    for p in prompts:
        out.append(_max_pairwise(nemo.noise_diffs(pipe, encode_prompts(pipe, [p]), list(seeds))[0]).max())
    return torch.stack(out)


def _max_pairwise(d: torch.Tensor) -> torch.Tensor:
    """For ``S`` noise differences: each one's max SSIM to any other (``S`` values)."""
    s = d.shape[0]
    pair = _ssim(d[:, None].expand(-1, s, -1, -1, -1).flatten(0, 1), d[None].expand(s, -1, -1, -1, -1).flatten(0, 1))
    return pair.view(s, s).fill_diagonal_(-1.0).max(dim=1).values


def calibrate_nemo_threshold(pipe, non_memorized: Sequence[str], seeds: Sequence[int] = tuple(range(1, 11)),
                             margin: float = 0.05) -> dict:
    """A NeMo threshold for a model other than SD v1.4: the largest max-pairwise SSIM over non-memorized
    prompts plus ``margin`` (NeMo calibrated 0.428 on SD v1.4 from non-memorized LAION prompts)."""
    vals = max_pairwise_ssim(pipe, list(non_memorized), seeds)
    return {"n_prompts": len(vals), "max": float(vals.max()), "p99": float(vals.quantile(0.99)),
            "mean": float(vals.mean()), "threshold": round(float(vals.max()) + margin, 3)}


# ---- masks found by NeMo's reference code --------------------------------------------------------
REFERENCE_COLUMNS = {"refined": "Refined Neurons", "initial": "Initial Neurons"}


def _neuron_lists(cell: str | None) -> list[list[int]] | None:
    """A neuron cell of the reference's CSV (a list of lists of indices, as Python prints it), read as JSON."""
    try:
        lists = json.loads(cell or "")
    except ValueError:
        return None
    ok = isinstance(lists, list) and all(isinstance(x, list) and all(type(i) is int and i >= 0 for i in x)
                                         for x in lists)
    return lists if ok else None


def read_reference_rows(path: str | Path, neurons: str = "refined") -> list[dict]:
    """The rows of the reference's results CSV (see :func:`read_reference_masks`), checked for their shape:
    ``caption``, ``lists`` (one per layer), ``skipped`` and ``where`` (file and line, for messages)."""
    import csv

    if neurons not in REFERENCE_COLUMNS:
        raise DoriError(f"neurons must be one of {', '.join(REFERENCE_COLUMNS)}, got {neurons!r}")
    path, column = Path(path), REFERENCE_COLUMNS[neurons]
    other = next(c for c in REFERENCE_COLUMNS.values() if c != column)
    if not path.is_file():
        raise DoriError(f"NeMo results file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    rows, seen = [], {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a file saved by a spreadsheet starts with a BOM
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in ("Caption", column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DoriError(f"{path} is not the CSV of NeMo's 3_detect_memorized_neurons.py: it lacks the "
                            f"column(s) {missing} (';'-separated; found {reader.fieldnames})")
        for row in reader:
            caption, where = row["Caption"], f"{path}, line {reader.line_num}"
            lists = _neuron_lists(row[column])
            if lists is None:
                raise DoriError(f"{where}: {column} must be a list of lists of neuron indices, "
                                f"got {str(row[column])[:80]!r}")
            if caption in seen:
                raise DoriError(f"{where}: the caption {caption[:60]!r} has two rows ({seen[caption]}): keep one")
            seen[caption] = where
            # the reference writes empty lists in both columns for a prompt it skips as not memorized
            skipped = not any(lists) and not any(_neuron_lists(row.get(other)) or [])
            rows.append(dict(caption=caption, lists=lists, skipped=skipped, where=where))
    if not rows:
        raise DoriError(f"{path} holds no rows")
    return rows


def _reference_masks(rows: list[dict], pipe, path, neurons: str, layer_group: str) -> dict[str, Mask]:
    layers = resolve_layers(pipe.unet, layer_group)
    meta = dict(method="nemo-reference", neurons=neurons, layer_group=layer_group, source=str(path))
    masks = {}
    for row in rows:
        lists, where = row["lists"], row["where"]
        if len(lists) != len(layers):
            raise DoriError(f"{where}: {len(lists)} layer lists, but this model's {layer_group} group has "
                            f"{len(layers)} layers ({layers[0].name}, ...): were the neurons found on another "
                            "model, or in another layer group? (nemo-value: 7 on SD v1.x and 2.x)")
        for ref, idx in zip(layers, lists, strict=True):
            if idx and max(idx) >= ref.module.out_features:
                raise DoriError(f"{where}: neuron {max(idx)} is out of range for {ref.name} "
                                f"({ref.module.out_features} neurons): were the neurons found on another model?")
        masks[row["caption"]] = Mask("neuron", {ref.name: idx for ref, idx in zip(layers, lists, strict=True)},
                                     dict(meta, prompt=row["caption"], skipped=row["skipped"],
                                          model=getattr(pipe, "dori_name", None)))
    return masks


def read_reference_masks(path: str | Path, pipe, neurons: str = "refined",
                         layer_group: str = "nemo-value") -> dict[str, Mask]:
    """Neuron masks from the CSV of NeMo's reference code, one per caption, to attack them with DoRI.

    The reference's ``3_detect_memorized_neurons.py`` writes a ``;``-separated CSV with a row per prompt:
    ``Caption``, ``Initial Neurons``, ``Refined Neurons`` (and SSIMs). A neuron cell is a list per value
    layer, down blocks then the mid block (on SD v1.4 seven lists: layer ids 1-7 of ``nemo-value``), each
    list the output channels of that layer's ``attn2.to_v`` that its hooks scale by ``--scaling_factor``
    (default 0: zeroed, as dori's neuron masks; the factor is not in the CSV). The lists map in order onto
    this UNet's ``layer_group`` (``nemo-value``, the reference's layers; another group for lists written by
    a modified search); a CSV made for another architecture is refused. A prompt the reference skipped as
    not memorized has empty lists in both columns: its mask is empty (NeMo deactivates nothing for it) and
    its metadata says ``skipped``. Cells are read as JSON, never evaluated.

    Args:
        neurons: ``"refined"`` (the masks NeMo deploys) or ``"initial"`` (before the refinement).
    """
    return _reference_masks(read_reference_rows(path, neurons), pipe, path, neurons, layer_group)


def _method(mask_json: Path) -> str | None:
    try:
        return json.loads(mask_json.read_text())["meta"]["method"]
    except (ValueError, KeyError, TypeError):
        return None


def import_reference_masks(path: str | Path, model, out: str | Path, neurons: str = "refined",
                           layer_group: str = "nemo-value") -> dict[str, Mask]:
    """:func:`read_reference_masks`, saved as a folder of per-caption masks (``out/<caption-slug>``) that
    ``dori attack --masks NAME=OUT`` attacks.

    ``model``: the pipeline the neurons were found on, or what :func:`~dori.models.loading.load_pipeline`
    takes (loaded once the CSV and ``out`` have passed their checks). Every row is checked before anything is
    written. ``out`` may hold only masks this import wrote (an import repeated), so that neither another
    mask set nor dori's own NeMo masks (``RUN/masks/nemo``) are mixed in or overwritten.
    """
    from dori.models.layers import check_layer_group
    from dori.reports.images import slug

    rows = read_reference_rows(path, neurons)
    check_layer_group(layer_group)  # before the model loads
    out = Path(out)
    names: dict[str, str] = {}
    for row in rows:
        if names.setdefault(slug(row["caption"]), row["caption"]) != row["caption"]:
            raise DoriError(f"{row['where']}: the captions {names[slug(row['caption'])][:60]!r} and "
                            f"{row['caption'][:60]!r} map to one mask file name: import them separately")
    if out.exists() and not out.is_dir():
        raise DoriError(f"--out {out} is a file: give a folder for the masks")
    foreign = sorted(f.name for f in out.glob("*.json") if f.stem not in names or _method(f) != "nemo-reference")
    if foreign:
        raise DoriError(f"{out} already holds other masks ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): import into a new folder")
    if isinstance(model, (str, Path)):
        from dori.models.loading import load_pipeline

        model = load_pipeline(model)
    masks = _reference_masks(rows, model, path, neurons, layer_group)
    out.mkdir(parents=True, exist_ok=True)
    for caption, mask in masks.items():
        mask.save(out / slug(caption))
    return masks
