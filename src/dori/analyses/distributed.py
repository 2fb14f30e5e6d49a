"""One run over many processes (one per GPU): ``accelerate launch -m dori run study.toml``.

A run is made of items that are written to the run folder as they finish (generated captions, masks,
triggers). With several processes, each computes its share of them and writes them to the same folder
(it must be shared by all processes); after a barrier every process reads the others' items back, so
that every process assembles the same rows, and the first writes ``results.json`` and the report.
Nothing else is exchanged between processes, so a killed run resumes as before (``dori run DIR``), with
any number of processes.

Two ways to share the work:

- :meth:`Shard.owns` on an item key: evaluation splits the images still to generate;
- :meth:`Shard.each` over a list of jobs whose work is stored on disk (localize one caption's mask,
  attack one target): each process does its own jobs, waits for the others, then runs every job again,
  which now only reads what was stored.

Code that computes and stores an item calls :func:`stored_only` first: in the reading pass, an item that
is not on disk means the processes do not share the run folder or disagree on the item's key, and the run
stops with that message instead of quietly computing the item a second time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from dori.errors import DoriError

T = TypeVar("T")
R = TypeVar("R")

# A process that has finished its share waits for the slowest at each barrier: long enough for one
# stage of a 500-prompt study on one GPU.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes of one run: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str = "cpu") -> Shard:
        """The launcher's processes (``accelerate launch``, ``torchrun``: ``WORLD_SIZE`` > 1), or one.

        Starts the process group: gloo on the CPU (``device="cpu"``), NCCL on GPUs."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=str(device) == "cpu", timeout=BARRIER_TIMEOUT)
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        """The process that writes the run's results and prints them."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """Each process its own GPU: ``cuda`` becomes ``cuda:<local rank>`` when there are several."""
        if self.world == 1 or not device.startswith("cuda"):
            return device
        if device != "cuda":
            raise DoriError(f"device {device!r} with {self.world} processes would put them all on one GPU: "
                            "set device = \"cuda\" (each process takes the GPU of its local rank)")
        return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"

    def owns(self, key: str) -> bool:
        """Whether this process computes the item with this key (a hex digest: spread evenly)."""
        return self.world == 1 or int(key[:8], 16) % self.world == self.rank

    def wait(self) -> None:
        """Until every process gets here (nothing with one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def each(self, jobs: Sequence[T], work: Callable[[T], R], desc: str | None = None) -> list[R]:
        """``[work(job) for job in jobs]``, the jobs shared between processes (a progress bar if ``desc``).

        ``work`` must store what it computes in the run folder and read it back when called again: each
        process runs its own jobs (every ``world``-th), waits for the others, then runs all of them,
        which only reads. Every process gets every job's result."""
        from tqdm.auto import tqdm

        if self.world == 1:
            return [work(job) for job in tqdm(jobs, desc=desc, disable=desc is None)]
        for job in tqdm(jobs[self.rank :: self.world], desc=desc, disable=desc is None or not self.main):
            work(job)
        self.wait()
        token = _READING.set(self)
        try:
            return [work(job) for job in jobs]
        finally:
            _READING.reset(token)


SOLO = Shard()

# Set while Shard.each reruns every job after the barrier: the process that runs them only reads.
_READING: ContextVar[Shard | None] = ContextVar("dori_reading", default=None)


def stored_only(what: str) -> None:
    """Call before computing ``what`` (an item that is stored once computed). Raises in the reading pass of
    :meth:`Shard.each`, where every item has been stored by the process that owns it. (The reading pass is
    seen by the thread that runs it, not by threads it starts.)"""
    shard = _READING.get()
    if shard is not None:
        raise missing_item(shard, what)


def missing_item(shard: Shard, what: str) -> DoriError:
    """The error for an item another process should have stored and did not."""
    return DoriError(
        f"process {shard.rank} of {shard.world} finds no stored {what} after every process finished its share: "
        "either the run folder is not one folder shared by all processes (or a network file system does not "
        "show this process the others' files yet), or the processes disagree on the item's key (different "
        "settings, model files, library versions or devices per process). The items already stored are "
        "kept: fix that and resume with `dori run DIR`, with one process or several")


def close() -> None:
    """Leave the process group a launcher's processes joined (:meth:`Shard.from_env`), if any: at exit."""
    torch = sys.modules.get("torch")  # not imported: no process group either
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # the results are written: say so, do not fail the run here
            import logging

            logging.getLogger(__name__).warning("leaving the process group failed: %s", e)
