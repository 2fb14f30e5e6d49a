"""Run files: the arguments of one run (``run_demo``) in a file, for studies too long to retype.

``dori run PATH`` accepts
- a TOML or JSON run file whose keys are ``run_demo``'s arguments (``out`` included);
- a run directory: the ``run.json`` every run writes before it starts (so a killed run resumes with
  ``dori run DIR``), or, for runs older than that file, its ``results.json``;
- a ``results.json``: the recorded config, with the resolved attack and sampling settings pinned, so the
  run is repeated as it ran even if the model's defaults changed since.
Keys a run file leaves out take the defaults of ``dori attack`` (the paper's settings, every caption),
not the demo's 5-minute sizes. Relative paths are read from the current directory, as on the command line.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

from dori.errors import DoriError

RUN_FILE = "run.json"
# what `dori attack` uses: the paper's attack settings, all memorized captions and control photos
RUN_DEFAULTS = dict(seeds=[0, 1, 2, 3], attack={}, budgets=[0, 1, 10, 25, 50], control_per_kind=None,
                    max_targets=None, fidelity_per_kind=None, token_variants=4, per_prompt_fidelity=True)
_INT_LISTS = ("seeds", "budgets")
_STR_LISTS = ("stages", "detectors")
_RESOLVED = ("resolved_generation", "resolved_attack", "threshold")  # derived by a run, never arguments


def run_arguments() -> list[str]:
    from dori.analyses.demo import run_demo

    return [name for name in inspect.signature(run_demo).parameters if name != "command"]


def load_run_file(path: str | Path, out: str | Path | None = None) -> dict:
    """``run_demo``'s keyword arguments from ``path`` (see the module docstring); ``out`` overrides the file's."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (RUN_FILE, "results.json") if (path / n).is_file()]
        if not found:
            raise DoriError(f"{path} holds no {RUN_FILE} or results.json: give a run directory or a run file")
        path, out = found[0], out or path
    if not path.is_file():
        raise DoriError(f"run file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise DoriError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise DoriError(f"{path} must hold a table of run arguments, got {type(data).__name__}")
    if "manifest" in data:  # a results.json: repeat the run as it ran
        data = dict(data["manifest"].get("config") or {})
        data.update(data.get("resolved_generation") or {})
        if data.get("resolved_attack"):
            data["attack"] = data["resolved_attack"]
        out = out or path.parent
    for key in _RESOLVED:
        data.pop(key, None)
    return check_run_arguments({**RUN_DEFAULTS, **data, **({"out": str(out)} if out else {})}, path)


def check_run_arguments(args: dict, source: str | Path = "run file") -> dict:
    """Reject unknown keys and wrong types with one message naming the key and the fix."""
    from dori.attacks.dori import DoRI

    known = run_arguments()
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise DoriError(f"{source}: unknown key(s) {unknown}; a run file takes {', '.join(known)}")
    if "out" not in args:
        raise DoriError(f"{source} names no run directory: add out = \"DIR\" or pass --out DIR")
    for key in _INT_LISTS + _STR_LISTS:
        want = int if key in _INT_LISTS else str
        v = args.get(key)
        if v is not None and not (isinstance(v, list) and all(type(x) is want for x in v)):
            raise DoriError(f"{source}: {key} must be a list of {want.__name__}s, e.g. "
                            f"{key} = {[0, 1] if want is int else ['generate', 'bypass']}, got {v!r}")
    attack_keys = set(inspect.signature(DoRI).parameters)
    for key, allowed in (("attack", attack_keys), ("method_params", {"nemo", "wanda"})):
        v = args.get(key)
        if v is not None and (not isinstance(v, dict) or set(v) - allowed):
            raise DoriError(f"{source}: {key} must be a table with keys among {', '.join(sorted(allowed))}, "
                            f"got {v!r}")
    return args


def write_run_file(out: Path, args: dict) -> None:
    """Record a run's arguments before it starts, so ``dori run DIR`` resumes it after a kill."""
    from dori.reports.results import write_json

    write_json(out / RUN_FILE, args)
