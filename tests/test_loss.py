"""LM head + loss in vocabulary tiles: the same loss and gradients as the plain head, without whole logits."""
import pytest
import torch

from rollout_dist import ExactRollout
from rollout_dist.engine.loss import IGNORE_INDEX, cross_entropy_sum, head_cross_entropy_sum
from tests.helpers import VOCAB, grads_of, reference_loss_and_grads, tiny_model, worst_rel_error


def _head_case(dtype, bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 37, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(37, 16, generator=g))
        if bias:
            head.bias.copy_(torch.randn(37, generator=g))
    hidden = torch.randn(2, 9, 16, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 37, (2, 9), generator=g)
    targets[0, 2] = targets[1, -1] = IGNORE_INDEX
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tile", [1, 5, 16, 36])
def test_float64_tiles_equal_the_plain_head(tile, bias):
    head, hidden, targets = _head_case(torch.float64, bias)
    plain = cross_entropy_sum(head(hidden), targets)
    plain.backward(torch.tensor(0.7, dtype=torch.float64))
    expected = (hidden.grad.clone(), head.weight.grad.clone(), None if not bias else head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    tiled = head_cross_entropy_sum(hidden, head, targets, vocab_tile=tile)
    tiled.backward(torch.tensor(0.7, dtype=torch.float64))
    assert abs(tiled.item() - plain.item()) <= 1e-12 * abs(plain.item())
    assert torch.allclose(hidden.grad, expected[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(head.weight.grad, expected[1], rtol=1e-12, atol=1e-14)
    if bias:
        assert torch.allclose(head.bias.grad, expected[2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_tiles_no_worse_than_the_plain_head(bias):
    """bf16 head: the tiled loss and gradients are as close to an fp64 reference as the plain bf16 head."""
    ref_head, ref_hidden, targets = _head_case(torch.float64, bias, seed=1)
    cross_entropy_sum(ref_head(ref_hidden), targets).backward()
    errs = {}
    for tile in (0, 8):
        head, hidden, _ = _head_case(torch.float64, bias, seed=1)
        head, hidden = head.to(torch.bfloat16), hidden.detach().to(torch.bfloat16).requires_grad_(True)
        head_cross_entropy_sum(hidden, head, targets, vocab_tile=tile).backward()
        errs[tile] = max(((hidden.grad.double() - ref_hidden.grad).norm() / ref_hidden.grad.norm()).item(),
                         ((head.weight.grad.double() - ref_head.weight.grad).norm()
                          / ref_head.weight.grad.norm()).item())
    assert errs[8] <= 1.25 * errs[0] + 1e-4, errs


def test_float64_rollout_with_tiled_head_matches_full_sequence():
    model = tiny_model("llama", tie_word_embeddings=True)  # tied: the tile gradient reaches the embedding too
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(31))
    ref_loss, ref = reference_loss_and_grads(model, ids)
    result = ExactRollout(5, vocab_tile=17, attention="math", offload="kv").run(model, ids)
    worst, name = worst_rel_error(grads_of(model), ref)
    assert worst <= 1e-9, (name, worst)
    assert abs(result.loss - ref_loss) <= 1e-12 * ref_loss
