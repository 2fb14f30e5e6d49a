"""results.json: the single source of truth of a run; written atomically, assembled from per-item files.

Schema (``schema_version`` 3: bypass aggregates per budget; 2: ``detection`` became a list, one entry per
detector)::

    {
      "schema_version": 3,
      "manifest": {"command", "config", "versions", "git", "seeds", "started", "finished", "seconds"},
      "samples": [ {stage, setting, budget, caption, kind, seed, image, reference, score, threshold,
                    replicated, metric, ...extra fields} ],
      "aggregates": { "<stage>/<setting>/<kind>": {n_samples, n_images, score_mean, score_std,
                      score_median, score_mad, mr, mr_any_seed}, ... },  # bypass: "<setting>@<budget>"
      "metric": {"name", "threshold", "distractors"} or null (no image generated, e.g. ``dori detect``),
      "detection": [ {name, detector, scores, auroc, tpr_at_1pct_fpr, roc, ...} ],
      ... other stage-specific sections
    }

Paths in rows (``image``, ``reference``) are relative to the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dori.errors import DoriError

SCHEMA_VERSION = 3


def cache_dir() -> Path:
    """dori's cache of derived data that is costly to compute again (NeMo's activation statistics, the
    pixel-ssim distractor scores): ``$DORI_CACHE``, default ``~/.cache/dori``. Every entry is keyed by
    what it was computed from; deleting the folder only costs the time to compute them again."""
    return Path(os.environ.get("DORI_CACHE") or Path.home() / ".cache" / "dori")


def make_out_dir(out: Path, what: str = "") -> None:
    """Make ``out`` (``what`` names it in the errors, e.g. "the run directory "): one clear error when it cannot
    be made, or exists and cannot be read and written (someone else's folder, a read-only mount)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoriError(f"cannot make {what}{out}: {e.strerror} ({e.filename}); give --out a folder you can "
                        "write") from None
    if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        raise DoriError(f"cannot read and write in {what}{out}: give --out a folder you can write")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: str | Path, tensors: dict) -> None:
    """``tensors`` as a safetensors file, atomically (a unique temporary name: processes may write at once)."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}))


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def tensor_digest(t) -> str:
    """A short content hash of a tensor (its dtype, shape and bytes)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def git_hash() -> str | None:
    """The commit of the dori source tree (with ``-dirty`` if modified), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        h = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if h.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return h.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    import dori

    return {"dori": dori.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def manifest(command: str, config: dict, seeds) -> dict:
    return {"command": command, "config": config, "versions": versions(), "git": git_hash(),
            "seeds": list(seeds), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class ItemStore:
    """Finished work items of a run, one JSON file each under ``<run>/items/``.

    A killed run started again skips the items that have a file and redoes only the rest; a file is
    written atomically after the item's images, so it exists only for complete items.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "items"
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str):
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, key: str, value) -> None:
        write_json(self.path(key), value)
