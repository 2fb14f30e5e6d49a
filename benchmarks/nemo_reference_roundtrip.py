"""`dori import-nemo` checked end to end: NeMo masks written in the reference code's CSV format, imported,
and attacked as a saved mask set must give the NeMo rows of the same run score for score.

    python benchmarks/nemo_reference_roundtrip.py [--run runs/demo]

Takes a finished `dori demo` run (run first if the folder has no results.json: about 3 min on 2 cores).
Its NeMo masks (`masks/nemo`, one per memorized caption) are written as the reference's
`3_detect_memorized_neurons.py` writes its results: a `;`-separated CSV, one list of neurons per layer
(the tiny model's NeMo searches all 10 value projections, so `--layer-group value`, not the reference's 7
of SD's `nemo-value`). The CSV is imported with `import_reference_masks`, the run is repeated in a copy of
its folder (`<run>-nemo-ref`, the run itself is left as it is) with the imported masks as the set
`nemo-ref` (every other item is reused from the copy), and each `nemo-ref*`
sample row is paired with the `nemo*` row of the same caption, budget and seed. Prints the number of pairs
and the largest score difference (0.0 when the import is exact).
"""

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

from dori import load_pipeline
from dori.analyses.demo import run_demo
from dori.analyses.runfile import load_run_file
from dori.mitigations.masks import Mask
from dori.mitigations.nemo import import_reference_masks
from dori.models.layers import resolve_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a dori demo run (made if it has no results.json)")
    run = Path(ap.parse_args().run).resolve()  # `--run .` has a name too
    if not (run / "results.json").is_file():
        run_demo(out=run)
    pipe = load_pipeline("tiny")
    layers = [ref.name for ref in resolve_layers(pipe.unet, "value")]
    rows = []
    for js in sorted((run / "masks" / "nemo").glob("*.json")):
        mask = Mask.load(js)
        if "prompt" in mask.meta:  # not the joint mask
            lists = [mask.layers[n].tolist() if n in mask.layers else [] for n in layers]
            rows.append([mask.meta["prompt"], "", str(lists), "", str(lists), ""])
    copy = run.with_name(run.name + "-nemo-ref")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    reference_csv = copy / "nemo_reference.csv"
    with open(reference_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Caption", "URL", "Initial Neurons", "Initial SSIM", "Refined Neurons", "Refined SSIM"])
        writer.writerows(rows)
    imported = copy / "nemo_reference_masks"
    import_reference_masks(reference_csv, pipe, imported, layer_group="value")
    res = run_demo(**{**load_run_file(copy), "masks": {"nemo-ref": str(imported)}}, command="roundtrip")
    pairs: dict[tuple, dict[bool, float]] = defaultdict(dict)
    for r in res["samples"]:
        setting = r["setting"]
        if setting.split("+")[0] in ("nemo", "nemo-ref"):  # the per-caption rows (not -joint, not -own)
            ref = setting.startswith("nemo-ref")
            pairs[(setting.replace("nemo-ref", "nemo"), r.get("budget"), r["caption"], r["seed"])][ref] = r["score"]
    both = [v for v in pairs.values() if len(v) == 2]
    print(f"{len(rows)} masks through the reference's CSV format; {len(both)} paired rows "
          f"({len(pairs) - len(both)} unpaired), largest score difference "
          f"{max(abs(v[True] - v[False]) for v in both) if both else float('nan')}")


if __name__ == "__main__":
    main()
