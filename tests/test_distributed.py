"""Several processes share one run (dori.analyses.distributed): every item computed once, same results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dori.analyses.distributed import Shard, stored_only
from dori.errors import DoriError
from dori.reports.images import slug


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
                stored_only(f"job {job}")
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
        assert not t.is_alive()
    assert sorted(computed) == sorted((j % world, j) for j in jobs)  # once each, by the process that owns it
    assert got == {r: [j * j for j in jobs] for r in range(world)}


def test_a_process_that_finds_another_s_item_missing_stops_instead_of_computing_it():
    """The processes disagree on the jobs' keys (here: each process keys them by its own rank)."""
    world, jobs = 2, list(range(4))
    store, lock = {}, threading.Lock()

    def work(job):
        key = (job, threading.current_thread().name)
        with lock:
            if key not in store:
                stored_only(f"job {job}")
                store[key] = job
            return store[key]

    barrier, errors = threading.Barrier(world), {}

    def process(r):
        try:
            ThreadShard(r, world, barrier).each(jobs, work)
        except DoriError as e:
            errors[r] = str(e)

    threads = [threading.Thread(name=str(r), target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert sorted(errors) == [0, 1]
    assert "process 1 of 2 finds no stored job 0" in errors[1] and "disagree on the item's key" in errors[1]
    assert "process 0 of 2 finds no stored job 1" in errors[0]
    assert sorted(store) == [(j, str(j % world)) for j in jobs]  # each computed only its own share
    stored_only("anything")  # outside the reading pass: nothing to say


class NoWait(Shard):
    def wait(self) -> None:  # the other process has "finished" without storing anything
        pass


def test_evaluation_stops_on_an_item_the_other_process_did_not_store(tiny_pipe, tmp_path):
    from dori.analyses.replication import evaluate_replication
    from dori.data.prompts import load_prompt_set
    from dori.metrics.pixel import PixelSSIM

    recs = load_prompt_set("tiny")[:2]
    args = dict(seeds=[0], metric=PixelSSIM(), gen_kwargs={"num_inference_steps": 2})
    # evaluation split by item key: each process generates the captions it owns, then misses the others'
    made = []
    for rank in (0, 1):
        run = tmp_path / f"rank{rank}"
        try:
            evaluate_replication(tiny_pipe, recs, run_dir=run, shard=NoWait(rank, 2), **args)
            missed = None
        except DoriError as e:
            missed = str(e)
        made.append(len(list((run / "items").glob("*.json"))) if (run / "items").is_dir() else 0)
        assert (missed is None) == (made[-1] == 2), missed  # it stops exactly when it lacks an item
        assert missed is None or f"process {rank} of 2 finds no stored images of" in missed
    assert sum(made) == 2  # every caption generated once, by its owner
    # evaluation inside a shared job (as the bypass runs it): the reading pass does not generate
    with pytest.raises(DoriError, match=re.escape("process 0 of 2 finds no stored images of '" + recs[1].caption[:20])):
        NoWait(0, 2).each(recs, lambda rec: evaluate_replication(tiny_pipe, [rec], run_dir=tmp_path / "each", **args))
    assert len(list((tmp_path / "each" / "items").glob("*.json"))) == 1


def test_the_bypass_stops_on_triggers_the_other_process_did_not_store(tiny_pipe, tmp_path):
    from dori.analyses.bypass import run_bypass
    from dori.analyses.demo import make_attack
    from dori.data.prompts import load_prompt_set
    from dori.metrics.pixel import PixelSSIM

    recs = [r for r in load_prompt_set("tiny") if r.memorized][:2]
    attack = make_attack(tiny_pipe, {"steps": 2, "pairs": 2})
    # one attack job per target: this process attacks the first, then finds the second's triggers missing
    missing = re.escape(f"process 0 of 2 finds no stored triggers (setting 'none') of ['{recs[1].caption[:20]}")
    with pytest.raises(DoriError, match=missing):
        run_bypass(tiny_pipe, recs, {"none": None}, PixelSSIM(), tmp_path, attack=attack, budgets=[0, 2], seeds=[0],
                   random_baseline=False, group_size=1, shard=NoWait(0, 2), gen_kwargs={"num_inference_steps": 2})
    assert [p.stem for p in (tmp_path / "triggers" / "none").glob("*.json")] == [slug(recs[0].caption)]


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
    procs = []  # both runs at once: 3 single-threaded processes keep 2 cores busy (one after the other: 1, then 2)
    for n, out in ((2, "two"), (1, "one")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "dori", "run", str(study), "--out", str(tmp_path / out)]
        log = tmp_path / f"{out}.log"  # a file, not a pipe: a full pipe would stall a run that nobody reads yet
        with log.open("w") as f:
            procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    try:
        for proc, log in procs:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:  # the other run, when one failed or hung: the launcher and its workers
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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
