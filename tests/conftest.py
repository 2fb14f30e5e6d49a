"""Shared fixtures. Determinism is switched on here, in one place.

Markers (skipped unless asked):
- ``weights``: needs real SD/SSCD weights on disk: ``DORI_SD_PATH=/path/to/sd-v1-4 pytest -m weights``
- ``gpu``: needs CUDA: ``pytest -m gpu``
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# cuBLAS is deterministic only with this workspace setting (read when CUDA starts; no effect on the CPU)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.use_deterministic_algorithms(True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    for item in items:
        if "weights" in item.keywords and "weights" not in markexpr:
            item.add_marker(pytest.mark.skip(reason="needs real weights: DORI_SD_PATH=... pytest -m weights"))
        if "gpu" in item.keywords and "gpu" not in markexpr:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device: pytest -m gpu"))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """dori's cache (NeMo statistics, distractor scores) in a folder of this session, shared by its tests and
    the processes they start: a run of the suite neither reads nor fills the user's ~/.cache/dori."""
    before = os.environ.get("DORI_CACHE")
    os.environ["DORI_CACHE"] = str(tmp_path_factory.mktemp("dori_cache"))
    yield Path(os.environ["DORI_CACHE"])
    if before is None:
        os.environ.pop("DORI_CACHE")
    else:
        os.environ["DORI_CACHE"] = before


@pytest.fixture(scope="session")
def weights_hash():
    """sha256 of a module's weights, every value, on any device: the check that a change was undone."""
    import hashlib

    def digest(module) -> str:
        h = hashlib.sha256()
        for name, p in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    return digest


@pytest.fixture(scope="session")
def tiny_pipe():
    from dori import load_pipeline

    return load_pipeline("tiny")
