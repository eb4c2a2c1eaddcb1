"""No process-wide mutable state: two models of two families, two rollouts, interleaved in one thread, each
gives its reference result; what an attention kernel learns stays in its rollout; out of memory is never taken
for a kernel's refusal of grouped K/V heads."""
import pytest
import torch

from rollout_dist import ExactRollout
from rollout_dist.model import split_attention
from rollout_dist.model.split_attention import SplitKernel, split_chunk_attention
from tests.helpers import VOCAB, grads_of, reference_loss_and_grads, tiny_model, worst_rel_error


def test_interleaved_training_rollout_and_fill_only_pass_of_another_family():
    trained = tiny_model("llama", num_hidden_layers=3)
    served = tiny_model("qwen2", num_hidden_layers=2, seed=1)
    served.eval()
    train_ids = torch.randint(0, VOCAB, (1, 26), generator=torch.Generator().manual_seed(51))
    serve_ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(52))
    ref_loss, ref_grads = reference_loss_and_grads(trained, train_ids)
    with torch.no_grad():
        ref_logits = served(serve_ids).logits

    training = ExactRollout(6, offload="all", attention="math")
    serving = ExactRollout(4, attention="sdpa")
    session = serving.new_state(served, 1, 24)
    losses = []
    for i in range(3):  # prefill 8 tokens of the served document, then a whole training document, and again
        logits = serving.fill(served, serve_ids[:, 8 * i:8 * (i + 1)], session)
        torch.testing.assert_close(logits, ref_logits[:, 8 * i + 4:8 * (i + 1)], rtol=0, atol=1e-12)
        losses.append(training.run(trained, train_ids).loss)
        worst, name = worst_rel_error(grads_of(trained), ref_grads)
        assert worst <= 1e-9, (i, name, worst)
        trained.zero_grad(set_to_none=True)
    session.close()
    assert all(abs(loss - ref_loss) <= 1e-12 * ref_loss for loss in losses)
    assert serving.host_pool.allocated == 0 and training.host_pool.allocated > 0


def test_a_kernel_refusal_is_remembered_by_its_rollout_only(monkeypatch):
    real = split_attention._forward_kernel

    def refuses_grouped_heads(backend, q, k, v, causal, scale):
        if q.shape[1] != k.shape[1]:
            raise RuntimeError("grouped heads not supported")
        return real("math", q, k, v, causal, scale)
    monkeypatch.setattr(split_attention, "_forward_kernel", refuses_grouped_heads)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    refused, other = SplitKernel("flash"), SplitKernel("flash")
    split_chunk_attention(q, k, v, None, refused)
    assert "flash" in refused.expanded_kv and "flash" not in other.expanded_kv


def test_out_of_memory_is_not_taken_for_a_refusal(monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
    monkeypatch.setattr(split_attention, "_forward_kernel", out_of_memory)
    kernel = SplitKernel("flash")
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(torch.OutOfMemoryError):
        split_chunk_attention(q, k, v, None, kernel)
    assert "flash" not in kernel.expanded_kv  # the next chunk still tries grouped heads
