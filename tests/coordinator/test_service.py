"""The coordinator's ordering and checks, and its TCP link: batches complete only when every rank ended the step,
in (step, document, chunk, stage, layer, rank) order; a killed, stalled or unreading coordinator raises
``CoordinatorLost`` within the timeout instead of hanging the rank."""
import random
import time

import pytest

from rollout_dist.coordinator import digest as dg
from rollout_dist.coordinator.service import (Coordinator, CoordinatorClient, CoordinatorLost, Hub, TcpHubLink,
                                              TcpRankLink, check_batch)


def rec(kind, rank, step, name="", **kw):
    return dg.Digest(kind, rank, step, name, **kw)


def test_batches_are_complete_and_ordered():
    core = Coordinator(world=3)
    records = [rec(dg.STATE, r, 1, f"layer.{layer}.key", document=d, chunk=c, layer=layer, stage=r % 2)
               for r in range(3) for d in (5, 2) for c in range(3) for layer in range(2)]
    records += [rec(dg.PARAM, r, 1, "w") for r in range(3)] + [rec(dg.STATE, 0, 2, "layer.0.key", chunk=0)]
    random.Random(0).shuffle(records)
    assert core.add(records) == []
    assert core.add([rec(dg.STEP_END, 0, 1), rec(dg.STEP_END, 2, 1)]) == []  # rank 1 has not ended step 1
    [(step, batch)] = core.add([rec(dg.STEP_END, 1, 1)])
    assert step == 1 and len(batch) == 3 * 12 + 3 + 3
    assert [r.order for r in batch] == sorted(r.order for r in batch)
    assert batch[0].document == -1 and batch[-1].document == 5  # step-level records first, then by document
    assert all(r.step == 1 for r in batch) and list(core.pending) == [2]


def test_rollback_voids_a_ranks_later_records():
    core = Coordinator(world=2)
    core.add([rec(dg.PARAM, 0, 3, "w"), rec(dg.PARAM, 1, 3, "w"), rec(dg.STEP_END, 1, 3)])
    core.rollback(1, 2)  # rank 1 went back to step 2: its step-3 records will come again
    assert core.add([rec(dg.STEP_END, 0, 3)]) == []
    [(_, batch)] = core.add([rec(dg.PARAM, 1, 3, "w"), rec(dg.STEP_END, 1, 3)])
    assert sorted((r.rank, r.kind) for r in batch) == [(0, dg.PARAM), (0, dg.STEP_END), (1, dg.PARAM),
                                                       (1, dg.STEP_END)]


def test_checks_name_the_odd_replica_and_compare_optimizer_state_only_when_replicated():
    params = [rec(dg.PARAM, r, 4, "model.w", stage=0, hash=7 if r != 2 else 8) for r in range(3)]
    params += [rec(dg.PARAM, r, 4, "model.v", stage=1, hash=r) for r in (3, 4)]  # another stage: its own group
    [line, other] = check_batch(params, zero_stage=1)
    assert "mismatch" in line and "model.w" in line and "rank 2;" in line and "after step 4" in line
    assert "model.v" in other and "ranks 3 and 4" in other
    optim = [rec(dg.OPTIM, r, 4, "optimizer.exp_avg", hash=r) for r in range(2)]
    assert check_batch(optim, zero_stage=1) == []  # ZeRO 1/2: partitions, nothing to compare
    assert len(check_batch(optim, zero_stage=0)) == 1
    p2p = [rec(dg.SENT, 0, 2, "hidden.0->1@fill", document=3, chunk=1, hash=5),
           rec(dg.RECEIVED, 1, 2, "hidden.0->1@fill", document=3, chunk=1, stage=1, hash=6),
           rec(dg.SENT, 0, 2, "hidden.0->1@fill", document=3, chunk=2, hash=9),
           rec(dg.RECEIVED, 1, 2, "hidden.0->1@fill", document=3, chunk=2, stage=1, hash=9)]
    [line] = check_batch(p2p, zero_stage=0)
    assert "received by rank 1" in line and "chunk 1" in line and "step 2" in line
    own = [rec(dg.MISMATCH, 1, 3, "layer.0.key: differs", chunk=2, layer=0, document=8)]
    assert check_batch(own, 0) == ["mismatch: layer.0.key: differs (rank 1, step 3, document 8, chunk 2, stage 0, "
                                   "layer 0)"]


@pytest.fixture
def tcp():
    """A hub with two ranks' clients on loopback; yields a function that starts it with fault settings."""
    made = []

    def start(world=2, timeout=3.0, queue_frames=64, **faults):
        link = TcpHubLink(0)
        batches = []
        hub = Hub(link, world, {r: 0 for r in range(world)}, 0, lambda s, b, v: batches.append((s, len(b))),
                  **faults)
        hub.start()
        clients = [CoordinatorClient(TcpRankLink(("127.0.0.1", link.port), r, timeout), timeout, queue_frames)
                   for r in range(world)]
        made.append((hub, clients))
        return hub, clients, batches
    yield start
    for hub, clients in made:
        hub.stop.set()
        for c in clients:
            c.close()
        hub.join(timeout=5)


def _step(clients, step, hashes=(1, 1)):
    for r, c in enumerate(clients):
        c.submit([rec(dg.PARAM, r, step, "w", hash=hashes[r]), rec(dg.STEP_END, r, step)])


def test_verdicts_reach_every_rank_and_the_log(tcp):
    hub, clients, batches = tcp()
    _step(clients, 1)
    _step(clients, 2, hashes=(1, 2))
    for c in clients:
        assert c.wait_batch(1)[0] == []
        verdict, records = c.wait_batch(2)
        assert len(verdict) == 1 and "ranks 0 and 1" in verdict[0]
        assert sorted(r.rank for r in records if r.kind == dg.PARAM) == [0, 1]
    assert batches == [(1, 4), (2, 4)]


def test_a_killed_coordinator_is_noticed_at_once(tcp):
    hub, clients, _ = tcp(timeout=30.0, kill_at=2)
    _step(clients, 1)
    _step(clients, 2)
    t0 = time.monotonic()
    with pytest.raises(CoordinatorLost, match="broke|ended"):
        clients[1].wait_batch(2)
    assert time.monotonic() - t0 < 5.0  # the closed link says so; no need to wait out the 30 s timeout


def test_a_stalled_coordinator_times_out(tcp):
    hub, clients, _ = tcp(timeout=1.5, stall_at=1)
    _step(clients, 1)
    t0 = time.monotonic()
    with pytest.raises(CoordinatorLost, match="no verdict on step 1 within"):
        clients[0].wait_batch(1)
    assert 1.4 < time.monotonic() - t0 < 4.0


def test_a_coordinator_that_reads_nothing_cannot_block_a_rank_for_longer_than_the_timeout(tcp):
    """The send queue is bounded: once it and the socket buffers are full, submit gives up after the timeout."""
    hub, clients, _ = tcp(world=1, timeout=1.0, queue_frames=2, stall_at=1)
    _step(clients[:1], 1)
    time.sleep(0.5)  # the hub stalls at step 1's batch and reads no more
    big = [rec(dg.STATE, 0, 2, "x" * 60000) for _ in range(20)]
    t0 = time.monotonic()
    with pytest.raises(CoordinatorLost):
        for _ in range(200):
            clients[0].submit(big)
    assert time.monotonic() - t0 < 10.0
