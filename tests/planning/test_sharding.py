"""Balanced sharding: equal counts, balance against a naive split, determinism, resumable position."""
import numpy as np
import pytest

from rollout_dist.planning.sharding import BalancedSharder, ShardingError, imbalance, naive_split


def lengths(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(2, rng.lognormal(8, 1.0, n).astype(np.int64))


def test_every_trainable_document_once_per_epoch_with_equal_counts():
    tok = lengths(403)
    tok[[5, 17]] = [0, 1]  # nothing to train on
    per_rank, left_out = BalancedSharder(tok, seed=3, world=4).epoch_plan(0)
    assert len(left_out) == 401 % 4 and {len(r) for r in per_rank} == {100}
    seen = sorted(sum(per_rank, []) + left_out)
    assert seen == sorted(set(range(403)) - {5, 17})
    assert per_rank == BalancedSharder(tok, seed=3, world=4).epoch_plan(0)[0]  # deterministic per seed
    assert per_rank != BalancedSharder(tok, seed=4, world=4).epoch_plan(0)[0]
    assert left_out != BalancedSharder(tok, seed=3, world=4).epoch_plan(1)[1]  # a different set sits out


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balance_beats_a_naive_split(world):
    tok = lengths(800, seed=world)
    balanced = imbalance(BalancedSharder(tok, seed=0, world=world).epoch_plan(0)[0], tok)
    naive = imbalance(naive_split(tok, seed=0, world=world), tok)
    bound = float(tok.max()) ** 2 / ((tok.astype(float) ** 2).sum() / world)  # the largest document alone
    assert balanced["attention"] <= max(1.05, bound * 1.05) < naive["attention"]
    assert balanced["tokens"] < 1.15 and balanced["tokens"] < naive["tokens"]


def test_a_step_gives_all_ranks_documents_of_similar_size():
    tok = lengths(400)
    per_rank, _ = BalancedSharder(tok, seed=0, world=4).epoch_plan(0)
    steps = np.array([[tok[d] for d in r] for r in per_rank])  # (rank, step)
    naive = np.array([[tok[d] for d in r] for r in naive_split(tok, seed=0, world=4)])
    spread, naive_spread = np.median(steps.max(0) / steps.min(0)), np.median(naive.max(0) / naive.min(0))
    assert spread < 1.6 and spread < naive_spread / 2
    assert not np.all(np.diff(steps[0]) <= 0)  # the steps are not in size order


def test_resume_continues_with_the_same_documents():
    tok = lengths(50)
    a = BalancedSharder(tok, seed=1, rank=1, world=2)
    first = [a.next() for _ in range(30)]  # runs into epoch 1
    state = a.state_dict()
    rest = [a.next() for _ in range(20)]
    b = BalancedSharder(tok, seed=1, rank=1, world=2)
    b.load_state_dict(state)
    assert [b.next() for _ in range(20)] == rest and state["epoch"] == 1
    assert first[:25] == BalancedSharder(tok, seed=1, rank=1, world=2).epoch_plan(0)[0][1]
    with pytest.raises(ShardingError, match="world"):
        BalancedSharder(tok, seed=1, rank=0, world=4).load_state_dict(state)
    with pytest.raises(ShardingError, match="tokens_xxh3"):
        BalancedSharder(tok + 1, seed=1, rank=1, world=2).load_state_dict(state)
    with pytest.raises(ShardingError, match="cannot feed 8"):
        BalancedSharder(tok[:5], seed=1, world=8)
