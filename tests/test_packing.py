"""Packed documents train exactly like the same documents one by one (float64, full-sequence HF reference)."""
import pytest
import torch
import torch.nn.functional as F

from rollout_dist import chunked_forward_backward
from rollout_dist.engine.packing import packed_positions
from tests.helpers import VOCAB, grads_of, tiny_model, worst_rel_error


def one_by_one(model, docs):
    """Sum of every document's token CEs / all their targets, each document its own HF forward."""
    model.zero_grad(set_to_none=True)
    tokens = sum(len(d) - 1 for d in docs)
    total = 0.0
    for d in docs:
        ids = torch.tensor([d])
        logits = model(ids).logits[0, :-1]
        loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum") / tokens
        loss.backward()
        total += loss.item()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return total, tokens, grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_row_equals_documents_one_by_one(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (13, 2, 9, 20)]
    ref_loss, ref_tokens, ref = one_by_one(model, docs)
    ids = torch.tensor([sum(docs, [])])
    seg = torch.tensor([sum(([i] * len(d) for i, d in enumerate(docs)), [])])
    for chunk_size in (1, 4, 7, 16, ids.shape[1]):
        result = chunked_forward_backward(model, ids, chunk_size=chunk_size, segment_ids=seg)
        assert result.num_tokens == ref_tokens
        assert abs(result.loss - ref_loss) <= 1e-12 * ref_loss
        worst, name = worst_rel_error(grads_of(model), ref)
        assert worst <= 1e-9, (chunk_size, name, worst)
        model.zero_grad(set_to_none=True)
    # without the segments the same row is one long document: a different loss
    plain = chunked_forward_backward(model, ids, chunk_size=7)
    assert abs(plain.loss - ref_loss) > 1e-5  # far above the 1e-12 agreement of the packed row


def test_positions_restart_in_every_document():
    seg = torch.tensor([[0, 0, 0, 5, 5, 7, 7, 7, 7]])
    assert packed_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_non_contiguous_segments_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="contiguous"):
        chunked_forward_backward(model, ids, chunk_size=2, segment_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))
