"""RunContext: one process until ``start``; the collectives over two gloo processes; a layout that does not
match the launched processes refused as a config error."""
import multiprocessing
import os
import socket

import pytest
import torch

from rollout_dist.config import ConfigError, ParallelConfig
from rollout_dist.train.context import RunContext


def test_before_start_it_is_one_process():
    context = RunContext("cpu")
    assert context.device == torch.device("cpu") and (context.rank, context.world) == (0, 1) and context.is_main
    assert context.smallest_over_ranks(7) == 7
    t = torch.tensor([1.5, 2.0])
    assert context.sum_over_ranks(t) is t
    context.barrier()  # no group needed


def test_a_layout_that_does_not_match_the_processes_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.pp=3 must divide the number of processes"):
        RunContext("cpu").start(ParallelConfig(pp=3))


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    context = RunContext("cpu")
    layout = context.start(ParallelConfig(pp=1))
    smallest = context.smallest_over_ranks(10 + 5 * rank)
    total = context.sum_over_ranks(torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64))
    replicas = context.sum_over_ranks(torch.tensor([1.0]), layout.data_parallel_group())
    context.close()
    results.put((rank, layout.dp, smallest, total.tolist(), float(replicas)))


@pytest.mark.slow  # two fresh interpreters import torch and DeepSpeed: about 5 s
def test_collectives_over_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [(0, 2, 10, [3.0, 10.0], 2.0), (1, 2, 10, [3.0, 10.0], 2.0)]
    assert all(p.exitcode == 0 for p in procs)
