"""Tests for epcomm.testing.launch: parallel_launch and ProcessGroupPool on gloo (CPU)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from epcomm.testing import ProcessGroupPool, find_free_port, parallel_launch
from epcomm.testing._selftest_workers import (
    allreduce_worker,
    info_worker,
    raise_on_rank_worker,
    raise_then_finish_worker,
    sleep_worker,
    still_running_worker,
)


def _assert_no_live_children() -> None:
    assert multiprocessing.active_children() == []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_find_free_port() -> None:
    port = find_free_port()
    assert isinstance(port, int)
    assert 0 < port < 65536


def test_unpicklable_worker_fails_fast() -> None:
    with pytest.raises(TypeError, match="picklable"):
        parallel_launch(2, lambda pgi: pgi.rank, backend="gloo")


@pytest.mark.parametrize("world_size", [2, 4])
def test_allreduce_results_in_rank_order(world_size: int) -> None:
    # A 4 MB result per rank is far more than a pipe buffer: checks results are drained before joining.
    numel = 1 << 20 if world_size == 2 else 0
    results = parallel_launch(world_size, allreduce_worker, numel, backend="gloo", timeout_s=120)
    expected_sum = world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world_size"] == world_size for r in results)
    assert all(r["sum"] == expected_sum for r in results)
    assert len({r["pid"] for r in results}) == world_size
    for rank, r in enumerate(results):
        assert r["payload"].numel() == numel
        if numel:
            assert float(r["payload"][0]) == rank
    _assert_no_live_children()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_rank_that_finished_first_stays_until_every_rank_reported() -> None:
    # Ranks on GPUs map each other's buffers through CUDA IPC: none may exit while a peer still works.
    results = parallel_launch(2, still_running_worker, 1.5, backend="gloo", timeout_s=120)
    assert results == [True, True]
    _assert_no_live_children()


def test_exception_in_one_rank_surfaces_traceback() -> None:
    with pytest.raises(RuntimeError) as info:
        parallel_launch(2, raise_on_rank_worker, 1, "boom-from-rank-one", backend="gloo", timeout_s=120)
    message = str(info.value)
    assert "1 of 2 ranks failed" in message
    assert "rank 1" in message
    assert "ValueError: boom-from-rank-one" in message
    assert "_fail_deliberately" in message  # the child's traceback, not just the message
    assert "rank 0 --" not in message
    _assert_no_live_children()


def test_failure_grace_lets_the_survivors_finish(tmp_path: Path) -> None:
    # Rank 1 fails at once; rank 0 works 6 s more, past the default 5 s grace, within 60 s.
    with pytest.raises(RuntimeError, match="1 of 2 ranks failed"):
        parallel_launch(
            2,
            raise_then_finish_worker,
            1,
            6.0,
            str(tmp_path),
            backend="gloo",
            timeout_s=120,
            failure_grace_s=60,
        )
    assert (tmp_path / "rank0.done").exists()
    _assert_no_live_children()


def test_timeout_kills_children(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not report"):
        parallel_launch(2, sleep_worker, 60.0, str(tmp_path), backend="gloo", timeout_s=5)
    assert time.monotonic() - start < 20
    _assert_no_live_children()
    for pid_file in tmp_path.glob("rank*.pid"):
        assert not _pid_alive(int(pid_file.read_text()))


def test_pool_sequence_survives_failure_and_restarts_after_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env_names = [
        "NCCL_NVLS_ENABLE",
        "OMP_NUM_THREADS",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
    ]
    with ProcessGroupPool(2, backend="gloo", timeout_s=120) as pool:
        assert pool.backend == "gloo"
        first = pool.run(allreduce_worker)
        assert [r["sum"] for r in first] == [3.0, 3.0]
        pids = [r["pid"] for r in first]

        with pytest.raises(RuntimeError, match="ValueError: pool-boom") as info:
            pool.run(raise_on_rank_worker, 0, "pool-boom")
        assert "rank 0" in str(info.value)
        assert pool.running

        infos = pool.run(info_worker, env_names)
        assert [i["pid"] for i in infos] == pids  # same processes: the failure did not break the pool
        for rank, i in enumerate(infos):
            assert i["gathered"] == [0, 1]
            assert i["device"] == "cpu"
            assert i["backend"] == "gloo"
            assert i["local_rank"] == rank
            assert i["num_threads"] == 1
            assert i["env"] == {
                "NCCL_NVLS_ENABLE": "0",
                "OMP_NUM_THREADS": "1",
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2",
            }

        with pytest.raises(TimeoutError, match="did not report"):
            pool.run(sleep_worker, 60.0, timeout_s=2)
        assert not pool.running
        for pid in pids:
            assert not _pid_alive(pid)

        again = pool.run(allreduce_worker)  # transparently restarted
        assert [r["sum"] for r in again] == [3.0, 3.0]
        assert {r["pid"] for r in again}.isdisjoint(pids)
    _assert_no_live_children()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(allreduce_worker)
