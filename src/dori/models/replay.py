"""Prefix replay: reuse the part of a forward pass that a mask change cannot reach.

NeMo's refinement runs the UNet again and again on the same inputs, each time with a mask that differs
from an accepted state in one layer. Every module call that *ends* before the first changed layer is
called gets exactly the inputs it got under the state, so its output is the state's output: only the
rest of the forward has to be computed.

:class:`PrefixReplay` wraps the *replay units* of a network: every child of every ancestor of a
changeable layer, with containers that are never called (``ModuleList``) replaced by their children
(for a UNet: ``conv_in``, ``time_embedding``, every block, its resnets and attentions, down to the
``attn1``, ``norm2``, ``to_q`` and ``to_k`` beside a value projection). In a forward inside
:meth:`session`, a unit whose whole call lies before the cut returns the state's output (tiled over the
candidates of a batched call) instead of computing it; every other unit computes, and its output is
recorded, so that :meth:`adopt` can make one candidate's forward the new state.

Nothing is replayed unless every argument of the forward equals the state's (tensors tiled over the
candidates), nor while autograd records, nor from an output that was changed in place since it was
recorded. Memory: the state and the last forward keep every unit output (nested ones included), about
one forward's activations each at their batch (a one-off measurement on a randomly initialised
SD-v1-shaped UNet at 64 x 64: about 235 MiB per sample in fp32 for the 7 ``nemo-value`` layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class _Call:
    name: str
    out: object  # the unit's output (None when it cannot be replayed)
    exit: int  # index of the next unit call after this one returned
    per_sample: bool  # True: computed in this forward (batch = candidates x samples); False: the state's
    versions: tuple = ()  # the output tensors' in-place version counters when recorded


@dataclass
class Recording:
    """The unit outputs of one forward; ``entry[layer]`` is where each changeable layer was first called."""

    batch: int
    inputs: list  # (name, value) of every argument, nested tensors flattened
    calls: dict[int, _Call] = field(default_factory=dict)
    entry: dict[str, int] = field(default_factory=dict)

    def candidate(self, j: int, n: int) -> Recording:
        """Candidate ``j`` of ``n`` stacked candidates (samples ``j*S .. (j+1)*S - 1``), copied."""
        if self.batch % n:
            raise ValueError(f"a batch of {self.batch} is not {n} stacked candidates")
        s = self.batch // n

        def take(t):
            return t[j * s : (j + 1) * s].clone() if t.ndim and t.shape[0] == self.batch else t

        calls = {}
        for i, c in self.calls.items():
            if c.out is None or _versions(c.out) != c.versions:  # changed in place after it was recorded
                out = None
            else:
                out = _map(take, c.out) if c.per_sample else c.out
            calls[i] = _Call(c.name, out, c.exit, False, _versions(out))
        return Recording(s, [(k, take(v) if isinstance(v, torch.Tensor) else v) for k, v in self.inputs],
                         calls, dict(self.entry))


class PrefixReplay:
    """Context manager: wrap the replay units of ``root`` for the changeable ``layers`` (module names)."""

    def __init__(self, root: torch.nn.Module, layers: Iterable[str]):
        self.root, self.layers = root, list(layers)
        for name in self.layers:
            root.get_submodule(name)  # raises for an unknown layer
        todo = set()
        for layer in self.layers:
            parts = layer.split(".")
            for depth in range(len(parts)):
                parent = ".".join(parts[:depth])
                todo |= {f"{parent}.{c}" if parent else c for c, _ in root.get_submodule(parent).named_children()}
        self.units = set()
        while todo:  # containers that are never called (ModuleList, ModuleDict): their children are units
            unit = todo.pop()
            mod = root.get_submodule(unit)
            if type(mod).forward is torch.nn.Module.forward:
                todo |= {f"{unit}.{c}" for c, _ in mod.named_children()}
            else:
                self.units.add(unit)
        self.state: Recording | None = None
        self.last: Recording | None = None
        self.replayed = 0  # unit calls replayed, over the whole context
        self._saved: dict[str, object] | None = None
        self._cut: int | None = 0  # replay unit calls that end at or before this index (None: all)
        self._repeat = self._counter = 0
        self._session = False  # inside session()
        self._forward: tuple[Recording, Recording | None, int | None] | None = None  # inside a root call

    # ---- wrapping ---------------------------------------------------------------------------------
    def __enter__(self) -> PrefixReplay:
        if self._saved is not None:
            raise RuntimeError("PrefixReplay is already active; use one instance per with-block")
        self._saved = {}
        try:
            for name in ["", *sorted(self.units)]:
                mod = self.root.get_submodule(name)
                self._saved[name] = mod.__dict__.get("forward")
                orig = mod.forward
                mod.forward = self._root_forward(orig) if name == "" else self._unit_forward(name, orig)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name, fwd in (self._saved or {}).items():
            mod = self.root.get_submodule(name)
            if fwd is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = fwd
        self._saved = None
        self.state = self.last = None

    def _root_forward(self, orig):
        def forward(*args, **kwargs):
            if not self._session or self._forward is not None:
                return orig(*args, **kwargs)
            inputs = _flatten_inputs(args, kwargs)
            tensors = [v for _, v in inputs if isinstance(v, torch.Tensor) and v.ndim]
            batch = tensors[0].shape[0]
            st, cut = self.state, self._cut
            if (st is None or torch.is_grad_enabled() or batch != st.batch * self._repeat
                    or not _same(inputs, st.inputs, self._repeat)):
                cut = 0
            rec = Recording(batch, [(k, v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs])
            self._forward, self._counter = (rec, st, cut), 0
            try:
                out = orig(*args, **kwargs)
            finally:
                self._forward = None
            self.last = None if torch.is_grad_enabled() else rec  # never keep autograd graphs alive
            return out

        return forward

    def _unit_forward(self, name: str, orig):
        is_layer = name in self.layers

        def forward(*args, **kwargs):
            if self._forward is None:
                return orig(*args, **kwargs)
            rec, st, cut = self._forward
            idx = self._counter
            self._counter += 1
            if is_layer:
                rec.entry.setdefault(name, idx)
            old = st.calls.get(idx) if st is not None and (cut is None or idx < cut) else None
            if (old is not None and old.name == name and old.out is not None and (cut is None or old.exit <= cut)
                    and _versions(old.out) == old.versions):
                self._counter = old.exit
                self.replayed += 1
                # the new recording is complete: the state's calls and layer entries inside this unit too
                for k in range(idx, old.exit):
                    if k in st.calls:
                        c = st.calls[k]
                        rec.calls[k] = _Call(c.name, c.out, c.exit, False, c.versions)
                for layer, e in st.entry.items():
                    if idx <= e < old.exit:
                        rec.entry.setdefault(layer, e)
                return _tile(old.out, self._repeat)
            out = orig(*args, **kwargs)
            keep = out if _batched(out, rec.batch) else None
            rec.calls[idx] = _Call(name, keep, self._counter, True, _versions(keep))
            return out

        return forward

    # ---- use ----------------------------------------------------------------------------------------
    @contextmanager
    def session(self, changed: Iterable[str] | None, repeat: int = 1):
        """Run forwards of ``repeat`` candidates stacked candidate-major, each recorded as :attr:`last`.

        Args:
            changed: the layers whose masks differ from the state's: what ends before the first of them
                is called is replayed (all of the forward when the list is empty); None: nothing is
                replayed (no state yet, or a change elsewhere than in the layers).
        """
        st = self.state
        if changed is None or st is None:
            cut = 0
        else:
            changed = list(changed)
            unknown = [n for n in changed if n not in self.layers]
            if unknown:
                raise ValueError(f"not a changeable layer of this PrefixReplay: {unknown}")
            cut = min((st.entry.get(n, 0) for n in changed), default=None)
        self._cut, self._repeat, self._session = cut, repeat, True
        try:
            yield self
        finally:
            self._session = False

    def adopt(self, j: int = 0, n: int = 1) -> None:
        """Make candidate ``j`` of the :attr:`last` forward's ``n`` candidates the state."""
        if self.last is None:
            raise RuntimeError("no recorded forward to adopt (none ran in a session, or it ran with grad)")
        self.state = self.last.candidate(j, n)


def _map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map(fn, x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, x) for x in obj)
    if isinstance(obj, dict):  # diffusers' BaseOutput is a dict and a dataclass
        return type(obj)(**{k: _map(fn, v) for k, v in obj.items()})
    return obj


def _leaves(obj) -> list:
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _leaves(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _leaves(o)]
    return [obj]


def _versions(out) -> tuple:
    return tuple(x._version for x in _leaves(out) if isinstance(x, torch.Tensor))


def _batched(out, batch: int) -> bool:
    """Replayable: every leaf a tensor with the forward's batch as its first dimension (or None)."""
    leaves = [x for x in _leaves(out) if x is not None]
    return bool(leaves) and all(isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch for x in leaves)


def _tile(out, n: int):
    """The state's output for ``n`` stacked candidates, in its memory format (channels-last convolutions
    compute differently); a new tensor, as callers may change it in place."""

    def tile(t: torch.Tensor) -> torch.Tensor:
        if n == 1:
            return t.clone()
        r = t.repeat(n, *([1] * (t.ndim - 1)))
        if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            r = r.contiguous(memory_format=torch.channels_last)
        return r

    return _map(tile, out)


def _flatten_inputs(args, kwargs) -> list:
    out = []

    def walk(key, v):
        if isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                walk(f"{key}[{i}]", x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}", x)
        else:
            out.append((key, v))

    for i, a in enumerate(args):
        walk(f"arg{i}", a)
    for k, v in kwargs.items():
        walk(k, v)
    return out


def _same(inputs: list, state: list, n: int) -> bool:
    if [k for k, _ in inputs] != [k for k, _ in state]:
        return False
    for (_, x), (_, s) in zip(inputs, state, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(s, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if x is not s and x != s:
                return False
            continue
        if x.ndim and x.shape[0] == s.shape[0] * n and n != 1:
            s = _tile(s, n)
        if x.shape != s.shape or not torch.equal(x, s):
            return False
    return True
