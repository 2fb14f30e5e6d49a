"""Prefix replay: reuse the part of a forward pass that a mask change cannot reach.

NeMo's refinement runs the UNet again and again on the same inputs, each time with a mask that differs
from an accepted state in one layer. Every module call that *ends* before the first changed layer is
called gets exactly the inputs it got under the state, so its output is the state's output: only the
rest of the forward has to be computed. On the tiny model, the value projection of the last up-block
attention is reached after about 72% of the forward's time (``benchmarks/nemo_batched.py`` prints the
share for every value layer).

:class:`PrefixReplay` wraps the *replay units* of a network: every child of every ancestor of a
changeable layer (for a UNet: ``conv_in``, ``time_embedding``, the blocks, their resnets and attentions,
down to the ``attn1``, ``norm2``, ``to_q`` and ``to_k`` beside a value projection). In a forward inside
:meth:`session`, a unit whose whole call lies before the cut returns the state's output (tiled over the
candidates of a batched call) instead of computing it; every other unit computes, and its output is
recorded, so that :meth:`adopt` can make one candidate's forward the new state. Nothing is replayed
unless the forward's tensor inputs equal the state's (tiled), and never while autograd is recording.

The outputs of a recorded forward stay in memory until the next one (about one forward's activations
at the candidates' batch).
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


@dataclass
class Recording:
    """The unit outputs of one forward; ``entry[layer]`` is where each changeable layer was called."""

    batch: int
    inputs: list
    calls: dict[int, _Call] = field(default_factory=dict)
    entry: dict[str, int] = field(default_factory=dict)

    def candidate(self, j: int, n: int) -> Recording:
        """Candidate ``j`` of ``n`` stacked candidates (samples ``j*S .. (j+1)*S - 1``)."""
        s = self.batch // n
        take = _slice(slice(j * s, (j + 1) * s))
        calls = {i: _Call(c.name, take(c.out) if c.per_sample and c.out is not None else c.out, c.exit, False)
                 for i, c in self.calls.items()}
        inputs = [take(x) if x.ndim and x.shape[0] == self.batch else x for x in self.inputs]
        return Recording(s, inputs, calls, dict(self.entry))


class PrefixReplay:
    """Context manager: wrap the replay units of ``root`` for the changeable ``layers`` (module names)."""

    def __init__(self, root: torch.nn.Module, layers: Iterable[str]):
        self.root, self.layers = root, list(layers)
        units = set()
        for layer in self.layers:
            parts = layer.split(".")
            for depth in range(len(parts)):
                parent = ".".join(parts[:depth])
                for child, _ in root.get_submodule(parent).named_children():
                    units.add(f"{parent}.{child}" if parent else child)
        self.units = sorted(units)
        self.state: Recording | None = None
        self.last: Recording | None = None
        self.replayed = self.computed = 0  # unit calls, over the whole context
        self._saved: dict[str, object] = {}
        self._cut: int | None = None  # replay unit calls that end at or before this index
        self._repeat = 1
        self._counter = 0
        self._active = False

    # ---- wrapping ---------------------------------------------------------------------------------
    def __enter__(self) -> PrefixReplay:
        for name in ["", *self.units]:
            mod = self.root.get_submodule(name)
            self._saved[name] = mod.__dict__.get("forward")
            orig = mod.forward
            mod.forward = self._root_forward(orig) if name == "" else self._unit_forward(name, orig)
        return self

    def __exit__(self, *exc) -> None:
        for name, fwd in self._saved.items():
            mod = self.root.get_submodule(name)
            if fwd is None:
                del mod.forward
            else:
                mod.forward = fwd
        self._saved.clear()

    def _root_forward(self, orig):
        def forward(*args, **kwargs):
            if not self._active:
                return orig(*args, **kwargs)
            inputs = [x for x in [*args, *kwargs.values()] if isinstance(x, torch.Tensor)]
            batch = inputs[0].shape[0]
            st, cut = self.state, self._cut
            if (st is None or torch.is_grad_enabled() or batch != st.batch * self._repeat
                    or not _same(inputs, st.inputs, self._repeat)):
                cut = 0
            self.last = Recording(batch, inputs)
            self._counter, self._now_cut, self._now_state = 0, cut, st
            return orig(*args, **kwargs)

        return forward

    def _unit_forward(self, name: str, orig):
        is_layer = name in self.layers

        def forward(*args, **kwargs):
            if not self._active:
                return orig(*args, **kwargs)
            rec, idx = self.last, self._counter
            self._counter += 1
            if is_layer:
                rec.entry[name] = idx
            st, cut = self._now_state, self._now_cut
            old = st.calls.get(idx) if st is not None and (cut is None or idx < cut) else None
            if old is not None and old.name == name and old.out is not None and (cut is None or old.exit <= cut):
                self._counter = old.exit
                self.replayed += 1
                rec.calls[idx] = _Call(name, old.out, old.exit, False)
                return _tile(old.out, self._repeat)
            out = orig(*args, **kwargs)
            self.computed += 1
            rec.calls[idx] = _Call(name, out if _batched(out, rec.batch) else None, self._counter, True)
            return out

        return forward

    # ---- use ----------------------------------------------------------------------------------------
    @contextmanager
    def session(self, changed: Iterable[str] | None, repeat: int = 1):
        """Forwards inside replay what ends before the first of the ``changed`` layers is called (all of
        the forward when none changed; nothing when ``changed`` is None), for ``repeat`` candidates
        stacked candidate-major; each forward is recorded as :attr:`last`."""
        st = self.state
        if changed is None or st is None:
            cut = 0
        else:
            changed = list(changed)
            cut = min((st.entry.get(n, 0) for n in changed), default=None)
        self._cut, self._repeat, self._active = cut, repeat, True
        try:
            yield self
        finally:
            self._active = False

    def adopt(self, j: int = 0, n: int = 1) -> None:
        """Make candidate ``j`` of the :attr:`last` forward's ``n`` candidates the state."""
        self.state = self.last.candidate(j, n)


def _map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
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


def _batched(out, batch: int) -> bool:
    """Replayable: every leaf a tensor with the forward's batch as its first dimension (or None)."""
    leaves = [x for x in _leaves(out) if x is not None]
    return bool(leaves) and all(isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch for x in leaves)


def _tile(out, n: int):
    return out if n == 1 else _map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))), out)


def _slice(sl: slice):
    return lambda out: _map(lambda t: t[sl], out)


def _same(inputs: list, state: list, n: int) -> bool:
    if len(inputs) != len(state):
        return False
    for x, s in zip(inputs, state, strict=True):
        if x.ndim and x.shape[0] == s.shape[0] * n and x.shape[0] != s.shape[0]:
            s = _tile(s, n)
        if x.shape != s.shape or not torch.equal(x, s):
            return False
    return True
