"""Prompt sets: one record type and readers for the formats users bring.

Formats (PAPER.md section 10):
- NeMo CSV (``;``-separated): Caption, URL, type (VM/TM), mean_sscd, max_sscd, Index;
- Wen JSONL: one object a line with caption, index, url; images in ``gt_images/<index>/``;
- Webster parquet: caption, url, overfit_type (MV/RV/TV/N), ... (needs ``pip install pyarrow``);
- plain text: one prompt a line.

Reference images are looked up on disk only (``images_dir``); dori never downloads them. A record whose
image is not on disk has ``reference_status="missing"`` (and the reason), never a blank image.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from dori.errors import DoriError

KINDS = ("memorized", "seen_once", "held_out", "procedural", "unseen", "VM", "TM", "MV", "RV", "TV", "N",
         "unknown")
MEMORIZED_KINDS = {"memorized", "VM", "TM", "MV", "RV", "TV"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PromptRecord:
    """One prompt of a prompt set.

    Attributes:
        caption: the prompt text.
        kind: memorized / seen_once / held_out / procedural / unseen (tiny model), VM / TM / N (NeMo),
            MV / RV / TV / N (Webster; N: not memorized), or unknown.
        reference: where the reference (training) image is: a file path, ``tiny:<name>`` for the
            embedded model's photos, or None.
        reference_status: ``ok`` (image available), ``missing`` (expected but not on disk; see
            ``meta["missing_reason"]``) or ``none`` (the prompt has no reference image by design).
        index: the source's own index of the prompt.
        source: which file or set it came from.
        meta: any other columns (URL, mean_sscd, ...).
    """

    caption: str
    kind: str = "unknown"
    reference: str | None = None
    reference_status: str = "none"
    index: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def memorized(self) -> bool:
        return self.kind in MEMORIZED_KINDS

    def to_dict(self) -> dict:
        return asdict(self)


def load_reference(record: PromptRecord) -> torch.Tensor:
    """The record's reference image as ``3 x H x W`` in [0, 1]. Raises if it is not available."""
    if record.reference_status != "ok" or record.reference is None:
        why = record.meta.get("missing_reason", "the prompt has no reference image")
        raise DoriError(f"no reference image for {record.caption!r}: {why}")
    if record.reference.startswith("tiny:"):
        from dori.zoo.tiny_data import load_reference_uri

        return load_reference_uri(record.reference)
    return load_image(record.reference)


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as ``3 x H x W`` float in [0, 1] (RGB)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255


def _find_image(folder: Path) -> Path | None:
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        return files[0] if files else None
    for ext in IMAGE_EXTS:
        if folder.with_suffix(ext).is_file():
            return folder.with_suffix(ext)
    return None


def _with_reference(rec: PromptRecord, images_dir: Path | None, key: str) -> PromptRecord:
    """Attach ``images_dir/<key>/`` (first image inside) or ``images_dir/<key>.<ext>`` if on disk."""
    if images_dir is None:
        rec.reference_status = "missing"
        rec.meta["missing_reason"] = "no images_dir given; dori does not download reference images"
        return rec
    found = _find_image(images_dir / key)
    if found is None:
        rec.reference_status = "missing"
        rec.meta["missing_reason"] = f"no image at {images_dir / key}[/|.png|.jpg] (dead URL or not downloaded)"
    else:
        rec.reference, rec.reference_status = str(found), "ok"
    return rec


def _require(columns, needed: list[str], path: Path, fmt: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DoriError(
            f"{path} is not a valid {fmt}: missing column(s) {missing}; found {list(columns)}. "
            f"Expected columns: {needed}."
        )


def read_nemo_csv(path: str | Path, images_dir: str | Path | None = None,
                  default_kind: str | None = None) -> list[PromptRecord]:
    """NeMo's ``;``-separated CSV (Caption;URL;type;mean_sscd;max_sscd;Index). Images: ``<Index>.*``.

    ``type`` is VM or TM (memorized), or N (not memorized, as Webster's). ``default_kind``: the kind of every
    row of a file without the column (``"N"`` for NeMo's ``unmemorized_laion_prompts.csv``, read as a
    control); None: the column is required."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a file saved by a spreadsheet starts with a BOM
        reader = csv.DictReader(f, delimiter=";")
        needed = ["Caption", "URL", "Index"] + (["type"] if default_kind is None else [])
        fmt = "NeMo CSV (';'-separated" + ("; a file of non-memorized prompts without `type` is read by "
                                           "--control-prompts and --stats-prompts)" if default_kind is None else ")")
        _require(reader.fieldnames or [], needed, path, fmt)
        rows = list(reader)
    out = []
    for i, r in enumerate(rows):
        kind = (r.get("type", default_kind) or "").strip()
        if kind not in ("VM", "TM", "N"):
            raise DoriError(f"{path}: row {i + 2} has type {kind!r}; NeMo CSV types are 'VM', 'TM' or 'N' "
                            "(not memorized)")
        meta = {k: v for k, v in r.items() if k and k not in ("Caption", "type", "Index")}  # k "": pandas' index
        rec = PromptRecord(r["Caption"], kind, index=str(r["Index"]).strip(), source=str(path), meta=meta)
        out.append(_with_reference(rec, Path(images_dir) if images_dir else None, rec.index))
    return out


def read_wen_jsonl(path: str | Path, images_dir: str | Path | None = None) -> list[PromptRecord]:
    """Wen et al.'s JSONL (caption, index, url); images in ``gt_images/<index>/`` next to the file."""
    path = Path(path)
    images = Path(images_dir) if images_dir else path.parent / "gt_images"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DoriError(f"{path}: line {n} is not valid JSON ({e.msg}); Wen JSONL has one object a line") from e
        _require(obj.keys(), ["caption", "index"], path, f"Wen JSONL (line {n})")
        meta = {k: v for k, v in obj.items() if k not in ("caption", "index")}
        rec = PromptRecord(obj["caption"], "memorized", index=str(obj["index"]), source=str(path), meta=meta)
        out.append(_with_reference(rec, images if images.is_dir() else None, rec.index))
    return out


def read_webster_parquet(path: str | Path, images_dir: str | Path | None = None) -> list[PromptRecord]:
    """Webster's parquet (caption, url, overfit_type in MV/RV/TV/N, ...). Images: ``<row index>.*``."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DoriError("reading parquet needs pyarrow: `pip install pyarrow` (or `pip install dori[parquet]`)") from e
    path = Path(path)
    try:
        table = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DoriError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from e
    _require(table[0].keys() if table else [], ["caption", "overfit_type"], path, "Webster parquet")
    out = []
    for i, r in enumerate(table):
        meta = {k: v for k, v in r.items() if k not in ("caption", "overfit_type") and _jsonable(v)}
        rec = PromptRecord(r["caption"], str(r["overfit_type"]), index=str(i), source=str(path), meta=meta)
        out.append(_with_reference(rec, Path(images_dir) if images_dir else None, rec.index))
    return out


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def read_text(path: str | Path, kind: str = "unknown") -> list[PromptRecord]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    out = [PromptRecord(ln, kind, index=str(i), source=str(path)) for i, ln in enumerate(lines)
           if ln and not ln.startswith("#")]
    return out


CONTROL_KINDS = ("seen_once", "held_out", "N")  # non-memorized kinds with reference images: the bypass's control


def load_control_set(name_or_path: str | Path, images_dir: str | Path | None = None,
                     prompt_set: Sequence[PromptRecord] = ()) -> list[PromptRecord]:
    """A prompt set of non-memorized images for the bypass benchmark's control (``--control-prompts``), e.g.
    NeMo's ``unmemorized_laion_prompts.csv`` (a NeMo CSV without a ``type`` column: every row kind N) with
    its downloaded images. Only the records whose image is on disk are returned; they keep a control kind
    (seen_once, held_out, N), any other non-memorized kind becomes N. Refused: a record its file calls
    memorized, a caption given twice or also in the run's ``prompt_set`` (items are kept per caption), and
    a set none of whose images is on disk."""
    records = load_prompt_set(name_or_path, images_dir, default_kind="N")
    memorized = [r for r in records if r.memorized]
    if memorized:
        raise DoriError(f"control prompts {name_or_path}: {len(memorized)} row(s) are of a memorized kind "
                        f"({memorized[0].kind}, e.g. {memorized[0].caption[:60]!r}): the control takes "
                        "non-memorized images only (a Wen JSONL file is read as memorized; use a NeMo CSV)")
    usable = [r if r.kind in CONTROL_KINDS else replace(r, kind="N") for r in records if r.reference_status == "ok"]
    if not usable:
        why = records[0].meta.get("missing_reason", "its format has no images")
        raise DoriError(f"control prompts {name_or_path}: none of its {len(records)} prompts has a reference "
                        f"image ({why}); give the folder of its images with --control-images-dir")
    seen = Counter(r.caption for r in [*prompt_set, *usable])
    twice = [r.caption for r in usable if seen[r.caption] > 1]
    if twice:
        raise DoriError(f"control prompts {name_or_path}: the caption {twice[0][:60]!r} is listed twice, or is also "
                        "in the prompt set: items are kept per caption, so give each control image its own caption")
    return usable  # a control prompt without its image could not be attacked


def load_prompt_set(name_or_path: str | Path, images_dir: str | Path | None = None,
                    default_kind: str | None = None) -> list[PromptRecord]:
    """A registered prompt set by name (``"tiny"``) or a file by its extension (.csv, .jsonl, .parquet, .txt).
    ``default_kind``: the kind of a NeMo CSV's rows when it has no ``type`` column, and of a text file's.

    Example:
        >>> recs = load_prompt_set("tiny")
        >>> sorted({r.kind for r in recs})
        ['held_out', 'memorized', 'procedural', 'seen_once', 'unseen']
    """
    from dori.registry import PROMPT_SETS

    name = str(name_or_path)
    if name in PROMPT_SETS:
        return PROMPT_SETS.get(name)()
    path = Path(name).expanduser()
    if not path.is_file():
        PROMPT_SETS.entry(name)  # raises "unknown prompt set" with a did-you-mean
    readers = {".csv": partial(read_nemo_csv, default_kind=default_kind), ".jsonl": read_wen_jsonl,
               ".parquet": read_webster_parquet}
    if path.suffix == ".txt":
        records = read_text(path, default_kind or "unknown")
    elif path.suffix in readers:
        records = readers[path.suffix](path, images_dir)
    else:
        raise DoriError(f"{path}: unknown prompt file type {path.suffix!r}; use .csv (NeMo), .jsonl (Wen), "
                        ".parquet (Webster) or .txt (one prompt a line)")
    if not records:
        raise DoriError(f"{path} holds no prompts")
    return records
