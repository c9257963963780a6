"""Shared helpers: torch thread count from the CPU affinity and the local ranks."""

from __future__ import annotations

import os

import pytest

from tissuegraph._utils import set_torch_threads, torch_threads


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for var in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_threads_shared_among_local_ranks(eight_cpus):
    assert torch_threads() == 8
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "2")
    assert torch_threads() == 4
    # torchrun sets OMP_NUM_THREADS=1 for every multi-rank launch: not a user's cap there
    eight_cpus.setenv("OMP_NUM_THREADS", "1")
    assert torch_threads() == 4
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "16")
    assert torch_threads() == 1  # never 0
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "2")
    assert torch_threads(3) == 3  # train.threads > 0 wins


def test_omp_num_threads_caps_a_single_process(eight_cpus):
    eight_cpus.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads() == 2
    eight_cpus.setenv("OMP_NUM_THREADS", "junk")
    assert torch_threads() == 8


def test_set_torch_threads_under_two_local_ranks(eight_cpus):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    eight_cpus.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        assert set_torch_threads() == 2 and torch.get_num_threads() == 2
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bound_onednn_cache_keeps_a_value_the_user_set(monkeypatch):
    from tissuegraph._utils import ONEDNN_CACHE, bound_onednn_cache

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"


def test_release_heap_runs_and_frees_nothing_live():
    import torch

    from tissuegraph._utils import release_heap

    x = torch.arange(10_000, dtype=torch.float32)
    junk = [torch.ones(4096) for _ in range(64)]
    del junk
    release_heap()
    release_heap()  # the second call reuses the looked-up function
    assert float(x.sum()) == 10_000 * 9_999 / 2
