"""torchrun's mechanics with two real gloo processes (no GPU): a slow phase on rank 0 (a download,
the decode) does not time the other rank out, gradient accumulation all-reduces once per optimizer
update, a resume gives each rank its own RNG states, and the ranks' memory plans agree. One spawn
of two processes runs every check (tests/ddp_workers.py); the full torchrun runs are in
test_distributed.py (slow tier)."""
from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

import ddp_workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gloo")
    mp.start_processes(ddp_workers.worker, args=(2, _free_port(), str(folder)), nprocs=2,
                       join=True, start_method="spawn")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _check(results: list[dict], name: str) -> list[dict]:
    for rank, r in enumerate(results):
        assert name in r, f"rank {rank} did not reach the {name} check: {r}"
        assert "error" not in r[name], f"rank {rank}, {name}: {r[name]['error']}\n{r[name]['trace']}"
    return [r[name] for r in results]


def test_the_other_ranks_outwait_a_slow_rank_0(two_ranks):
    """Rank 0 alone takes 7 s (the default group's timeout is 5 s here; NCCL's is 10 minutes, less
    than a slow download): the other rank waits on the long-timeout gloo group and both go on."""
    slow = _check(two_ranks, "slow_phase")
    assert [s["result"] for s in slow] == ["done", "done"]
    assert slow[1]["waited_s"] >= ddp_workers.SLOW_PHASE_S - 0.5


def test_accumulated_micro_batches_all_reduce_once_per_update(two_ranks):
    """DDP's forward arms the gradient all-reduce: no_sync must hold the forward as well as the
    backward of every micro-batch but the last. A comm hook counts the all-reduces."""
    for counts in _check(two_ranks, "accumulation"):
        per_update = counts["1"]["calls"] / counts["1"]["updates"]
        assert per_update >= 1
        assert counts["4"]["calls"] == per_update * counts["4"]["updates"], counts


def test_each_rank_resumes_with_its_own_rng_state(two_ranks):
    for rank, rng in enumerate(_check(two_ranks, "rng")):
        assert rng["ranks_saved"] == 2
        assert rng["after_resume"] == rng["after_checkpoint"], f"rank {rank}"


def test_every_rank_takes_the_smallest_micro_batch_any_rank_can_hold(two_ranks):
    """torchrun: each rank plans from its own free memory (rank 1's card is the smaller) and the
    ranks agree on the smallest micro-batch, so every rank's BatchNorm sees the same."""
    plans = _check(two_ranks, "memory")
    assert plans[0] == plans[1] and (plans[0]["micro"], plans[0]["accum"]) == (16, 2), plans
