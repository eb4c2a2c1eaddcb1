"""Stage partitioning: contiguous, every stage non-empty, the heaviest stage as light as possible."""
import itertools

import pytest

from rollout_dist.model.stage import partition_layers


def brute_force(weights, head, stages):
    best = None
    n = len(weights)
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0,) + cuts + (n,)
        loads = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[-1] += head
        if best is None or max(loads) < best:
            best = max(loads)
    return best


@pytest.mark.parametrize("weights,head,stages", [
    ([1.0] * 22, 1.5, 2), ([1.0] * 22, 1.5, 4), ([3, 1, 4, 1, 5, 9, 2, 6], 2.0, 3), ([5.0] * 4, 0.0, 4),
])
def test_partition_is_optimal_and_contiguous(weights, head, stages):
    counts = partition_layers(weights, head, stages)
    assert len(counts) == stages and sum(counts) == len(weights) and min(counts) >= 1
    bounds = [0] + list(itertools.accumulate(counts))
    loads = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
    loads[-1] += head
    assert max(loads) == pytest.approx(brute_force(weights, head, stages))


def test_long_documents_balance_layers_not_the_head():
    layer, head, attention = 44e6, 65.5e6, 2048 * 131072
    assert partition_layers([layer] * 22, head, 2) == [12, 10]  # short documents: the head weighs
    assert partition_layers([layer + attention] * 22, head, 2) == [11, 11]  # 128K tokens: attention dominates


def test_too_many_stages_is_refused():
    with pytest.raises(ValueError, match="cannot split 2 decoder layers into 3"):
        partition_layers([1.0, 1.0], 0.0, 3)
