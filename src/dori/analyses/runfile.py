"""Run files: the arguments of one run (``run_demo``) in a file, for studies too long to retype.

``dori run PATH`` accepts
- a TOML or JSON run file whose keys are ``run_demo``'s arguments (``out`` included); keys it leaves out
  take the defaults of ``dori attack`` (the paper's settings, every caption), with all five stages, not
  the demo's 5-minute sizes;
- a run directory, or its ``run.json``: the arguments every run writes before it starts, so a killed run
  resumes with ``dori run DIR``;
- a ``results.json``: the recorded config, with the resolved attack and sampling settings pinned, so the
  run is repeated as it ran even if the model's defaults changed since.
A recorded file must hold every argument (no default is filled in, except for arguments added since, with
the value that repeats the older run). Relative paths are read from the current directory, as on the
command line; a run records the ones that exist as absolute paths (:func:`absolute_path`), so ``dori run
DIR`` resumes it from any directory. The layout and the rules are in docs/results.md (run files).
"""

from __future__ import annotations

import difflib
import json
import logging
import numbers
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from dori.errors import DoriError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# the paper's attack budgets (DoRI steps) of the MR-vs-steps curve; kept here, not in bypass.py, so that the
# CLI can read its defaults without importing torch
PAPER_BUDGETS = (0, 1, 10, 25, 50)
# what `dori attack` uses (the paper's attack settings, all memorized captions and control photos), with
# every stage: generate, detect, nemo, wanda, bypass
# (`dori attack` takes its defaults from here too, so the two cannot drift apart)
RUN_DEFAULTS = dict(seeds=[0, 1, 2, 3], attack={}, budgets=list(PAPER_BUDGETS), control_per_kind=None,
                    max_targets=None, fidelity_per_kind=None, token_variants=4, per_prompt_fidelity=True)
_RESOLVED = ("resolved_generation", "resolved_attack", "threshold")  # derived by a run, never arguments
# arguments added after run.json was, with the value that repeats a run recorded before them
_ADDED_LATER = {"early_stop": False, "masks": None, "control_prompts": None, "control_images_dir": None,
                "finetuned": None}


def type_hints(fn) -> dict:
    return {k: v for k, v in typing.get_type_hints(fn).items() if k not in ("return", "command", "self")}


def _run_hints() -> dict:
    from dori.analyses.demo import run_demo

    return type_hints(run_demo)


def _accepts(hint, v) -> bool:
    """Whether a value fits a parameter's annotation: a TOML/JSON value (lists stand for sequences and
    tuples), or one from Python (a tuple or range, numpy numbers); a bool is never a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in args)
    if hint is type(None):
        return v is None
    if origin in (Sequence, list, tuple):
        seq = isinstance(v, (list, tuple, range))
        return seq and all(_accepts(args[0], x) for x in v) if args else seq
    if origin is dict:
        return isinstance(v, dict) and all(_accepts(args[1], x) for x in v.values()) if args else isinstance(v, dict)
    if origin is not None:
        return isinstance(v, origin)
    if hint in (int, float):
        return isinstance(v, numbers.Integral if hint is int else numbers.Real) and not isinstance(v, bool)
    return type(v) is hint if hint is bool else isinstance(v, hint)


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args if a is not type(None) and a is not Path)
    if origin in (Sequence, list, tuple):
        return f"a list of {_describe(args[0], True)}" if args else "a list"
    if origin is dict or hint is dict:
        return f"a table of {_describe(args[1], True)}" if args and args[1] is not dict else "a table"
    names = {str: ("text", "texts"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             bool: ("true or false", "true or false values")}
    return names[hint][plural] if hint in names else str(hint)


def check_types(args: dict, hints: dict, source, where: str = "") -> None:
    for key, v in args.items():
        if v is not None and not _accepts(hints[key], v):
            raise DoriError(f"{source}: {where}{key} must be {_describe(hints[key])}, got {v!r}")


def load_run_file(path: str | Path, out: str | Path | None = None) -> dict:
    """``run_demo``'s keyword arguments from ``path`` (see the module docstring); ``out`` overrides the file's."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (RUN_FILE, "results.json") if (path / n).is_file()]
        if not found:
            raise DoriError(f"{path} holds no {RUN_FILE} or results.json: give a run directory or a run file")
        path = found[0]
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
    recorded = path.name == RUN_FILE or "manifest" in data  # written by a run: its folder is the run
    if "manifest" in data:  # a results.json: repeat the run as it ran
        config = data["manifest"].get("config") if isinstance(data["manifest"], dict) else None
        if not isinstance(config, dict):
            raise DoriError(f"{path} has no manifest config: is it a dori results.json?")
        data = dict(config)
        data.update(data.get("resolved_generation") or {})
        if data.get("resolved_attack"):
            data["attack"] = data["resolved_attack"]
    for key in _RESOLVED:
        data.pop(key, None)
    if recorded:  # every argument, or one added later with the value that repeats older runs
        data = {**_ADDED_LATER, **data}
        _warn_if_a_folder_takes_the_name(data.get("model"), path)
        missing = sorted(set(_run_hints()) - set(data) - {"out"})
        if missing:
            raise DoriError(f"{path} was written by an older dori and lacks {', '.join(missing)}: write a run "
                            "file with the arguments you want (docs/results.md, run files)")
    else:
        data = {**RUN_DEFAULTS, **data}
    if out or recorded:
        data["out"] = str(out or path.parent)
    return check_run_arguments(data, path)


def _warn_if_a_folder_takes_the_name(model, path: Path) -> None:
    """A recorded model that is not an absolute path was a hub id (or a path an older dori kept as given):
    a folder of that name in this directory is what a resumed run would load, so say so."""
    from dori.registry import MODELS

    if not isinstance(model, str) or model in MODELS or Path(model).expanduser().is_absolute():
        return
    if Path(model).expanduser().exists():
        log.warning("%s names the model %r as written (a hub id, or a path recorded by an older dori); the "
                    "folder %s here is loaded. If the run used the hub's model, resume from another directory.",
                    path, model, os.path.abspath(Path(model).expanduser()))


def check_run_arguments(args: dict, source: str | Path = "run file") -> dict:
    """Reject unknown keys and wrong types with one message naming the key and the fix, before a model loads."""
    from dori.attacks.dori import DoRI

    hints = _run_hints()
    unknown = sorted(set(args) - set(hints))
    if unknown:
        near = {k: difflib.get_close_matches(k, list(hints), n=1) for k in unknown}
        hint = "; ".join(f"{k}: did you mean {m[0]}?" for k, m in near.items() if m)
        raise DoriError(f"{source}: unknown key(s) {unknown}{' (' + hint + ')' if hint else ''}; "
                        f"a run file takes {', '.join(hints)}")
    if "out" not in args:
        raise DoriError(f"{source} names no run directory: add out = \"DIR\" or pass --out DIR")
    check_types(args, hints, source)
    attack_hints = type_hints(DoRI.__init__)
    bad = sorted(set(args.get("attack") or {}) - set(attack_hints))
    if bad:
        raise DoriError(f"{source}: attack has no parameter(s) {bad}; DoRI takes {', '.join(attack_hints)}")
    check_types(args.get("attack") or {}, attack_hints, source, "attack.")
    try:
        DoRI(**(args.get("attack") or {}))  # its own value checks (init, t_weighting, ranges); no model needed
    except ValueError as e:
        raise DoriError(f"{source}: attack: {e}") from None
    bad = sorted(set(args.get("method_params") or {}) - {"nemo", "wanda"})
    if bad:
        raise DoriError(f"{source}: method_params has tables for {bad}; the methods are nemo and wanda")
    return args


def absolute_path(value, names=(), exists=None):
    """``value`` made absolute if it names an existing file or folder and is not one of ``names``.

    A run passes each of its path arguments through this before it records them: ``run.json`` then resumes
    the run from any directory, and the keys of its finished items (which hold the model's name and the
    reference images' paths) do not depend on the directory it was started in. Names (``"tiny"``, a
    registered prompt set), hub ids, an empty value and a path that does not exist are kept as written (the
    latter's own error comes later, naming it as given). Symbolic links and ``..`` are kept, not resolved:
    a file's name and folder are what its readers go by (a hub cache's files are links to nameless blobs).
    ``exists``: how to tell that ``value`` names something on disk (default: the path exists).
    """
    if not value or str(value) in names:
        return value
    path = Path(value).expanduser()
    if not (exists(path) if exists else path.exists()):
        return value
    return str(path.absolute())  # not abspath: `link/..` is not always `.`


def write_run_file(out: Path, args: dict) -> None:
    """Record a run's arguments before it starts, so ``dori run DIR`` resumes it after a kill."""
    from dori.reports.results import write_json

    write_json(out / RUN_FILE, args)
