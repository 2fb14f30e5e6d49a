"""Memorization rate (MR) and score summaries over seeds and images.

MR, documented aggregation: a generation is replicated when its score exceeds the metric's
threshold. Per image, the replication rate is the fraction of its seeds that replicate
(``aggregation="mean"``, default, as the paper's MR of 0.98 for 98% of generations) or 1 if any seed
replicates (``aggregation="any"``, the stricter audit view). MR is the mean over images.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping


def memorization_rate(rows: Iterable[Mapping], aggregation: str = "mean", key: str = "caption") -> float:
    """MR over sample rows with ``replicated`` booleans, grouped per image by ``key``."""
    per_image: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_image[r[key]].append(bool(r["replicated"]))
    if not per_image:
        return float("nan")
    if aggregation == "mean":
        rates = [sum(v) / len(v) for v in per_image.values()]
    elif aggregation == "any":
        rates = [float(any(v)) for v in per_image.values()]
    else:
        raise ValueError(f"aggregation must be 'mean' or 'any', got {aggregation!r}")
    return sum(rates) / len(rates)


def summarize(rows: list[Mapping]) -> dict:
    """Mean, std, median and MAD of the scores, MR (both aggregations) and counts."""
    scores = [float(r["score"]) for r in rows]
    if not scores:
        return {"n_samples": 0}
    med = statistics.median(scores)
    return {
        "n_samples": len(scores),
        "n_images": len({r["caption"] for r in rows}),
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        "score_median": med,
        "score_mad": statistics.median(abs(s - med) for s in scores),
        "mr": memorization_rate(rows, "mean"),
        "mr_any_seed": memorization_rate(rows, "any"),
    }
