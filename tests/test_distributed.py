"""Several processes share one run (dori.analyses.distributed): every item computed once, same results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dori.analyses.distributed import Shard


@dataclass(frozen=True)
class ThreadShard(Shard):
    """A process of a run, played by a thread: the barrier is a threading one."""

    barrier: threading.Barrier | None = None

    def wait(self) -> None:
        self.barrier.wait(timeout=30)


def test_each_computes_every_job_once_and_gives_every_process_all_results():
    world, jobs = 3, list(range(10))
    store, computed, lock = {}, [], threading.Lock()

    def work(job):  # stores what it computes, reads it back when called again (as the run's items do)
        with lock:
            if job not in store:
                computed.append((int(threading.current_thread().name), job))
                store[job] = job * job
            return store[job]

    barrier, got = threading.Barrier(world), {}
    threads = [threading.Thread(name=str(r), target=lambda r=r: got.__setitem__(
        r, ThreadShard(r, world, barrier).each(jobs, work))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(computed) == sorted((j % world, j) for j in jobs)  # once each, by the process that owns it
    assert got == {r: [j * j for j in jobs] for r in range(world)}


def test_owns_gives_each_key_to_exactly_one_process():
    import hashlib

    keys = [hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(300)]
    owners = [[r for r in range(3) if Shard(r, 3).owns(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)
    assert {o[0] for o in owners} == {0, 1, 2}
    assert all(Shard().owns(k) for k in keys)


RUN = dict(seeds=[0], stages=["generate", "detect", "wanda", "bypass"], max_targets=2, fidelity_per_kind=1,
           budgets=[0, 2], control_per_kind=1, token_variants=1, num_inference_steps=4, attack={"pairs": 2})


def test_two_processes_give_the_results_of_one(tmp_path):
    """`torchrun --nproc_per_node 2 -m dori run` (gloo on the CPU) against the same run in one process,
    both with one thread per process, so that they make the same computations."""
    study = tmp_path / "study.json"
    study.write_text(json.dumps(RUN))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, out in ((2, "two"), (1, "one")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "dori", "run", str(study), "--out", str(tmp_path / out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("one", "two"))

    assert two["manifest"]["processes"] == 2 and one["manifest"]["processes"] == 1
    assert len(one["samples"]) > 0
    for section in ("samples", "detection", "bypass", "aggregates"):
        assert_same(one[section], two[section], section)
    assert_same(one["mitigations"]["wanda"]["summary"], two["mitigations"]["wanda"]["summary"], "wanda")
    # the work was shared (masks and triggers made by both processes) and done once: the same items and images
    run = tmp_path / "two"
    masks = {json.loads(p.read_text())["meta"]["process"] for p in (run / "masks" / "wanda").glob("*.json")
             if p.stem != "_joint"}
    triggers = {json.loads(p.read_text())["process"] for p in (run / "triggers").rglob("*.json")}
    assert masks == triggers == {0, 1}
    for folder in ("items", "images", "masks", "triggers"):
        assert files(tmp_path / "one" / folder) == files(run / folder), folder
    assert not list(run.rglob("*.tmp"))  # no half-written file left behind


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_same(a, b, where: str) -> None:
    """Equal, floats within 1e-5 (the processes batch the images differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-5), where
    else:
        assert a == b, where


def test_several_processes_take_one_gpu_each(monkeypatch):
    from dori.errors import DoriError

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert Shard(1, 2).device("cuda") == "cuda:1"
    assert Shard(1, 2).device("cpu") == "cpu" and Shard().device("cuda:3") == "cuda:3"
    with pytest.raises(DoriError, match="all on one GPU"):
        Shard(0, 2).device("cuda:0")
