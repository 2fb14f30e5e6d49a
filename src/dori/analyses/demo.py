"""``dori demo``: generate every caption of a prompt set over several seeds and measure replication."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from dori.data.prompts import load_prompt_set
from dori.errors import DoriError
from dori.metrics.replication import summarize
from dori.models.loading import load_pipeline
from dori.reports.html import render_report
from dori.reports.results import SCHEMA_VERSION, ItemStore, manifest, write_json

log = logging.getLogger(__name__)

DEMO_SEEDS = (0, 1, 2, 3)


def make_metric(name: str | None, pipe, sscd_path: str | None = None):
    """The replication metric: pixel-ssim for pixel-space models (the tiny one), SSCD-NeMo otherwise."""
    from dori.models.pixel_vae import PixelIdentityVAE
    from dori.registry import METRICS

    if name is None:
        name = "pixel-ssim" if isinstance(pipe.vae, PixelIdentityVAE) else "sscd-nemo"
    cls = METRICS.get(name)
    if name.startswith("sscd"):
        if not sscd_path:
            raise DoriError(f"metric {name!r} needs a local SSCD TorchScript file: pass --sscd PATH "
                            "(dori never downloads it), or use --metric pixel-ssim")
        return cls(sscd_path)
    return cls()


def aggregate(samples: list[dict]) -> dict:
    groups = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            groups[f"{s['stage']}/{s['setting']}/{s['kind']}"].append(s)
    return {k: summarize(v) for k, v in groups.items()}


def procedural_accuracy(samples: list[dict]) -> dict | None:
    rows = [s["procedural"] for s in samples if "procedural" in s]
    if not rows:
        return None
    return {f"{k}_accuracy": sum(r[f"{k}_ok"] for r in rows) / len(rows)
            for k in ("color", "shape", "background")} | {
        "all_accuracy": sum(r["ok"] for r in rows) / len(rows), "n_samples": len(rows)}


def score_histogram(samples: list[dict], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            by_kind[s["kind"]].append(s["score"])
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    for kind, scores in sorted(by_kind.items()):
        ax.hist(scores, bins=30, range=(-0.2, 1.0), alpha=0.55, label=f"{kind} (n={len(scores)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("replication score (own reference; best reference match if none)")
    ax.set_ylabel("generations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run_demo(
    model: str = "tiny",
    out: str | Path = "runs/demo",
    prompt_set: str = "tiny",
    seeds: tuple[int, ...] = DEMO_SEEDS,
    metric: str | None = None,
    sscd_path: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    device: str = "cpu",
    images_dir: str | None = None,
) -> dict:
    """Run the demo and write ``out/results.json`` and ``out/report.html``; returns the results dict.

    A killed run started again with the same arguments reuses the captions it had finished.
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(model=str(model), prompt_set=str(prompt_set), seeds=list(seeds), metric=metric,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, device=device)
    man = manifest("dori demo", config, seeds)
    records = load_prompt_set(prompt_set, images_dir)  # validate cheap inputs before loading the model
    pipe = load_pipeline(model, device=device)
    m = make_metric(metric, pipe, sscd_path)
    d = pipe.dori_defaults
    gen = dict(num_inference_steps=num_inference_steps or d.num_inference_steps,
               guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale)
    config.update(resolved_generation=gen, metric=m.name, threshold=m.threshold)
    missing = [r for r in records if r.reference_status == "missing"]
    if missing:
        log.warning("%d prompts have no reference image on disk (reported in results.json, not replaced): %s",
                    len(missing), "; ".join(r.caption[:40] for r in missing[:5]))
    from dori.analyses.replication import evaluate_replication

    samples = evaluate_replication(pipe, records, seeds, m, out, store=ItemStore(out), gen_kwargs=gen)
    results = {
        "schema_version": SCHEMA_VERSION,
        "manifest": man,
        "metric": {"name": m.name, "threshold": m.threshold},
        "prompts": [r.to_dict() for r in records],
        "samples": samples,
        "aggregates": aggregate(samples),
        "plots": [{"title": "Replication scores by kind", "path": "plots/scores.png"}],
    }
    proc = procedural_accuracy(samples)
    if proc:
        results["procedural"] = proc
    score_histogram(samples, m.threshold, out / "plots" / "scores.png")
    man["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    man["seconds"] = round(time.time() - t0, 1)
    write_json(out / "results.json", results)
    render_report(out)
    return results
