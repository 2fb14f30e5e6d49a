"""Render a run's results.json into report.html. The report never recomputes: it only lays out rows."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from dori.data.prompts import MEMORIZED_KINDS
from dori.reports.results import write_atomic

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{padding:3px 8px;border:1px solid #ddd;font-size:13px}
th{background:#f4f4f4} .num{text-align:right;font-variant-numeric:tabular-nums}
img.px{width:72px;height:72px;image-rendering:pixelated;display:block}
.cell{display:inline-block;margin:2px;text-align:center;font-size:11px}
.rep{outline:3px solid #d33} .norep{outline:1px solid #ccc}
.caption{font-size:12px;color:#555;max-width:260px} .muted{color:#777;font-size:12px}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _score(row: dict) -> str:
    return "n/a" if row.get("score") is None else f"{row['score']:.2f}"


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(src: str | None, label: str, cls: str = "norep") -> str:
    if src is None:
        box = "<div class='px muted' style='width:72px;height:72px'>no<br>reference</div>"
        return f"<div class='cell'>{box}{label}</div>"
    return f"<div class='cell'><img class='px {cls}' src='{html.escape(src)}'>{label}</div>"


def image_grid(samples: list[dict], threshold: float) -> str:
    """One row per caption: reference | generations (score under each; red outline = replicated)."""
    by_caption: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_caption[s["caption"]].append(s)
    out = ["<table><tr><th>caption</th><th>reference</th><th>generations (seed: score)</th></tr>"]
    for caption, rows in by_caption.items():
        rows.sort(key=lambda r: r["seed"])
        ref = rows[0].get("reference")
        gens = "".join(_cell(r["image"], f"s{r['seed']}: {_score(r)}", "rep" if r["replicated"] else "norep")
                       for r in rows)
        extra = ""
        if rows[0].get("nearest_reference") and not ref:
            extra = "<div class='muted'>score = best match among reference photos</div>"
        out.append(f"<tr><td class='caption'>{html.escape(caption)}{extra}</td><td>{_cell(ref, '')}</td>"
                   f"<td>{gens}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _bypass_section(b: dict, samples: list[dict], timing: dict | None) -> str:
    """The paper's table, then image rows: reference | original prompt | DoRI trigger | random, mitigated."""
    top = max(b["budgets"])
    out = [f"<h2>Bypass benchmark: {html.escape(b['attack'])}</h2>",
           "<p class='muted'>Each memorized image is attacked through the mitigation (its own mask, or a fine-tuned "
           "UNet); the non-memorized control (seen-once and held-out photos) is attacked with the same budget on the "
           "unmitigated model. random = the prompt embedding plus Gaussian noise with the norm of DoRI's move.</p>",
           _table(b["table"], ["setting", "n_images", "n_samples", "mr", "mr_any_seed", "score_mean", "score_std"])]
    t = timing or {}
    if t.get("n"):
        out.append(f"<p class='muted'>attack time per target image: {t['mean_seconds_per_image']:.1f} s</p>")
    out += _per_image_tables(b)
    by = defaultdict(list)
    for s in samples:
        if s["stage"] == "bypass":
            by[(s["setting"], s["budget"], s["caption"])].append(s)
    settings = sorted({k[0].rsplit("+", 1)[0] for k in by}, key=lambda m: (m == "none", m))  # control last

    def cells(rs):
        rs = sorted(rs, key=lambda r: r["seed"])
        return "".join(_cell(r["image"], _score(r), "rep" if r["replicated"] else "norep") for r in rs)

    for m in settings:
        caps = list(dict.fromkeys(k[2] for k in by if k[0] == f"{m}+dori"))
        name = html.escape(m)
        if m == "none":  # the control; with --mitigation none, the memorized targets on the model as it is too
            memorized = any(k[0] == "none+dori" and rs[0]["kind"] in MEMORIZED_KINDS for k, rs in by.items())
            name = ("the model as it is: memorized targets and the non-memorized control" if memorized
                    else "the non-memorized control, unmitigated")
        out.append(f"<h3>{name}: original prompt vs DoRI trigger ({top} steps)</h3>")
        out.append(f"<table><tr><th>caption</th><th>kind</th><th>reference</th><th>{html.escape(m)}, original prompt"
                   f"</th><th>{html.escape(m)} + DoRI</th><th>{html.escape(m)} + random</th></tr>")
        for c in caps:
            first = by[(f"{m}+dori", 0, c)] or by[(f"{m}+dori", top, c)]
            out.append(f"<tr><td class='caption'>{html.escape(c)}</td><td>{html.escape(first[0]['kind'])}</td>"
                       f"<td>{_cell(first[0].get('reference'), '')}</td><td>{cells(by[(f'{m}+dori', 0, c)])}</td>"
                       f"<td>{cells(by[(f'{m}+dori', top, c)])}</td><td>{cells(by[(f'{m}+random', top, c)])}</td></tr>")
        out.append("</table>")
    return "".join(out)


def _per_image_tables(b: dict) -> list[str]:
    """The table's rows per attacked image (memorized targets, then the control): generations that replicate
    / generations (seeds; seeds x variants for word-perturbed prompts), and the best score."""
    order = list(dict.fromkeys(r["setting"] for r in b["table"]))
    out = []
    for memorized, title in ((True, "memorized targets"), (False, "non-memorized control")):
        imgs = [i for i in b.get("per_image", []) if (i["kind"] in MEMORIZED_KINDS) == memorized]
        if not imgs:
            continue
        cols = [c for c in order if any(c in i["cells"] for i in imgs)]
        out.append(f"<h3>Per image, {title}: generations that replicate / generations (best score); "
                   "generations: seeds, times variants for word-perturbed prompts</h3>"
                   "<table><tr><th>caption</th>"
                   "<th>kind</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        for i in imgs:
            cells = "".join(f"<td class='num'>{c['replicated']}/{c['generations']} ({c['score_max']:.2f})</td>"
                            if c else "<td></td>" for c in (i["cells"].get(col) for col in cols))
            out.append(f"<tr><td class='caption'>{html.escape(i['caption'])}</td><td>{html.escape(i['kind'])}</td>"
                       f"{cells}</tr>")
        out.append("</table>")
    return out


def similarity(fid: dict) -> str:
    """A mitigation's side effect on non-memorized captions, as text: its mean and minimum, or why there is none."""
    if fid.get("mean") is None:
        return "not measured (the prompt set has no non-memorized caption)"
    return f"{fid['mean']:.3f} (min {fid['min']:.3f})"


def render_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from ``run_dir/results.json``."""
    run_dir = Path(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    m = res["manifest"]
    metric = res.get("metric") or {}  # None when no image was generated (detection alone)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dori report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>dori report</h1>",
             f"<p class='muted'>command <code>{html.escape(m.get('command', ''))}</code> · model "
             f"<code>{html.escape(str(m['config'].get('model')))}</code> · git {html.escape(str(m.get('git')))}"
             f" · seeds {m.get('seeds')} · {m.get('seconds', 0):.0f} s"
             + (f" · metric <b>{html.escape(metric['name'])}</b>, replicated when score &gt; {metric['threshold']}"
                + (" and &gt; the reference's distractor score" if metric.get("distractors") else "")
                if metric else "") + "</p>"]
    agg_rows = [{"stage/setting/kind": k, **v} for k, v in res.get("aggregates", {}).items()]
    if agg_rows:
        parts.append("<h2>Aggregates</h2>")
        parts.append(_table(agg_rows, ["stage/setting/kind", "n_images", "n_samples", "score_mean", "score_std",
                                       "score_median", "score_mad", "mr", "mr_any_seed"]))
        parts.append("<p class='muted'>MR: mean over images of the fraction of seeds whose score exceeds the "
                     "threshold; mr_any_seed counts an image once any seed replicates; bypass rows are per "
                     "attack budget (@steps). For captions without a reference image (procedural, unseen) the "
                     "score is the best match among all reference photos of the set: any replication there is "
                     "regurgitation.</p>")
    if "procedural" in res:
        parts.append("<h2>Procedural captions: named colour and shape</h2>")
        shown = {k: v for k, v in res["procedural"].items() if v is not None}  # None: attribute never named
        parts.append(_table([shown], list(shown)))
    for d in res.get("detection", []):
        parts.append(f"<h2>Detection: {html.escape(d['detector'])}</h2><p>AUROC <b>{d['auroc']:.3f}</b>, "
                     f"TPR at 1% FPR <b>{d['tpr_at_1pct_fpr']:.2f}</b> (memorized vs all other captions)</p>")
        if "threshold" in d:
            parts.append(f"<p>Above the model's NeMo threshold {d['threshold']}: <b>{d['flagged_memorized']:.2f}</b>"
                         f" of the memorized captions, {d['flagged_others']:.2f} of the others.</p>")
        parts.append(_table(sorted(d["scores"], key=lambda r: -r["score"]), ["caption", "kind", "score"]))
    by_key = defaultdict(list)
    for s in res["samples"]:
        by_key[(s["setting"], s["caption"])].append(s)
    for name, mres in res.get("mitigations", {}).items():
        sm = mres["summary"]
        parts.append(f"<h2>Mitigation: {html.escape(name)}</h2><p class='muted'>{html.escape(sm['method'])}</p>")
        fid = sm["non_memorized_similarity_to_unmitigated"]
        if sm.get("mask_kind") == "patch":
            parts.append(f"<p>memorized MR {sm['mr_before']:.2f} &rarr; <b>{sm['mr_after']:.2f}</b> with the "
                         f"fine-tuned UNet ({sm['joint_mask_size']} weights changed); non-memorized captions with "
                         f"it: {html.escape(fid['measure'])} = {similarity(fid)}</p>")
        else:
            parts.append(f"<p>memorized MR {sm['mr_before']:.2f} &rarr; <b>{sm['mr_after']:.2f}</b> with each "
                         f"prompt's own mask; joint mask size {sm['joint_mask_size']}; non-memorized captions "
                         f"with the joint mask: {html.escape(fid['measure'])} = {similarity(fid)}</p>")
        own = sm.get("non_memorized_similarity_per_prompt_mask")
        if own and own["mean"] is not None:
            parts.append(f"<p>non-memorized captions each under one memorized caption's own mask: "
                         f"{similarity(own)}</p>")
        cols = ["caption", "mask_size", "score_before", "mr_before", "score_after", "mr_after"]
        cols += ["seconds"] if any(t.get("seconds") is not None for t in mres["table"]) else []  # none: a fine-tune
        cols += [c for c in ("signal_floor", "threshold_reachable") if any(c in t for t in mres["table"])]
        parts.append(_table(mres["table"], cols))
        rows = ["<table><tr><th>caption</th><th>reference</th><th>unmitigated</th><th>mitigated</th></tr>"]
        for t in mres["table"]:
            plain = sorted(by_key[("none", t["caption"])], key=lambda r: r["seed"])
            mitig = sorted(by_key[(name, t["caption"])], key=lambda r: r["seed"])
            ref = (plain or mitig)[0].get("reference")

            def cells(rs):
                return "".join(_cell(r["image"], _score(r), "rep" if r["replicated"] else "norep") for r in rs)

            rows.append(f"<tr><td class='caption'>{html.escape(t['caption'])}</td><td>{_cell(ref, '')}</td>"
                        f"<td>{cells(plain)}</td><td>{cells(mitig)}</td></tr>")
        rows.append("</table>")
        parts.append("".join(rows))
    if "bypass" in res:
        parts.append(_bypass_section(res["bypass"], res["samples"], m.get("attack_timing")))
    for plot in res.get("plots", []):
        parts.append(f"<h2>{html.escape(plot['title'])}</h2><img src='{html.escape(plot['path'])}' width='640'>")
    samples = res["samples"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in samples:
        groups[(s["stage"], s["setting"], s["kind"])].append(s)
    for (stage, setting, kind), rows in groups.items():
        if stage == "bypass":
            continue  # laid out above, one row per target
        parts.append(f"<h2>{html.escape(stage)} · setting {html.escape(setting)} · {html.escape(kind)}</h2>")
        parts.append(image_grid(rows, metric.get("threshold", 0)))
    parts.append("</body></html>")
    out = run_dir / "report.html"
    write_atomic(out, "\n".join(parts))
    return out
