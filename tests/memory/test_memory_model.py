"""Memory mode's model and its chunked backward, against independent references (float64).

References: the plain HF model run on each chunk alone with positions restarting at 0 (the model at
initialisation), and plain autograd through every chunk (``MemoryModel.forward``) for the chunked backward."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import rollout_dist
from rollout_dist import MemoryConfig, chunked_forward_backward, with_memory
from rollout_dist.engine.streams import StreamKey
from rollout_dist.engine.weighting import ImportanceWeights
from tests.helpers import VOCAB, tiny_model

TOL = 1e-9


def memory_model(family="llama", seed=0, live=True, **cfg):
    """A float64 memory model; ``live`` gives its zero-initialised gates random values, so the memory and the
    chunk-index track contribute (at initialisation they contribute exactly nothing)."""
    model = with_memory(tiny_model(family, seed=seed), MemoryConfig(slots=3, write_dim=8, **cfg))
    if live:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for mem in model.memory:
                mem.inject.copy_(torch.randn(mem.inject.shape, generator=g, dtype=torch.float64))
                mem.value.weight.copy_(0.3 * torch.randn(mem.value.weight.shape, generator=g, dtype=torch.float64))
                mem.gate_input.copy_(0.3 * torch.randn(mem.gate_input.shape, generator=g, dtype=torch.float64))
                mem.gate_state.copy_(0.3 * torch.randn(mem.gate_state.shape, generator=g, dtype=torch.float64))
            model.chunk_gate.copy_(torch.randn(model.chunk_gate.shape, generator=g, dtype=torch.float64))
    return model


def _ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids, chunk_size, labels=None, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, chunk_size=chunk_size, labels=labels, stream=StreamKey(5), **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _chunked(model, ids, chunk_size, labels=None, **kw):
    model.zero_grad(set_to_none=True)
    result = chunked_forward_backward(model, ids, chunk_size=chunk_size, labels=labels, stream=StreamKey(5), **kw)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return result, grads


def _assert_equal_grads(grads, ref, tol=TOL):
    assert grads.keys() == ref.keys()
    for name, g in ref.items():
        scale = max(g.norm().item(), 1e-30)
        err = (grads[name] - g).norm().item() / scale
        assert err <= tol or (grads[name] - g).abs().max().item() < 1e-14, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_at_initialisation_equals_base_model_on_each_chunk_alone(family):
    model = memory_model(family, live=False)
    ids = _ids(2, 23)
    out = model(ids, chunk_size=6)
    base = model.model
    for s in range(0, 23, 6):
        chunk = ids[:, s:s + 6]
        expected = base(chunk).logits  # HF alone: positions 0..c-1, no state
        got = out.logits[:, s:s + 6]
        assert (got - expected).abs().max().item() <= 1e-9 * expected.abs().max().item()
    # the zero factors (memory values, chunk-index gate) learn: their gradients are not zero
    out.loss.backward()
    assert model.memory[1].value.weight.grad.abs().sum() > 0
    assert model.chunk_gate.grad.abs().sum() > 0


def test_live_memory_carries_information_across_chunks():
    """The model's output on a chunk depends on earlier chunks only through the memory: change chunk 0 and the
    logits of chunk 2 change; ablate the state and they do not (the chunk-index track is not state)."""
    model = memory_model()
    a, b = _ids(1, 18, seed=1), _ids(1, 18, seed=1)
    b[0, :6] = _ids(1, 6, seed=9)[0]
    la, lb = model(a, chunk_size=6).logits, model(b, chunk_size=6).logits
    assert (la[:, 12:] - lb[:, 12:]).abs().max() > 1e-6
    la, lb = model(a, chunk_size=6, ablate_state=True).logits, model(b, chunk_size=6, ablate_state=True).logits
    assert (la[:, 12:] - lb[:, 12:]).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("length,chunk", [(23, 5), (20, 5), (9, 4), (7, 7)])
def test_chunked_backward_equals_plain_autograd(family, length, chunk):
    model = memory_model(family)
    ids = _ids(2, length)
    labels = ids.clone()
    labels[0, 2:5] = -100
    ref, ref_grads = _reference(model, ids, chunk, labels)
    result, grads = _chunked(model, ids, chunk, labels)
    _assert_equal_grads(grads, ref_grads)
    assert abs(result.loss - ref.loss.item()) <= 1e-12 * abs(ref.loss.item())
    assert result.num_chunks == -(-length // chunk)
    if length > chunk:  # gradients reach the memory's write path through the carried state
        assert ref_grads["memory.0.write_key.weight"].abs().sum() > 0
        assert ref_grads["memory.0.decay_log"].abs().sum() > 0
    else:  # one chunk: nothing is read, so nothing written is used
        assert "memory.0.write_key.weight" not in ref_grads


def test_gradient_flows_back_through_many_chunks():
    """A loss on the last chunk only reaches the first chunk's tokens' embeddings: through the state."""
    model = memory_model()
    ids = _ids(1, 30)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    _, grads = _chunked(model, ids, 5, labels)
    first_rows = grads["model.model.embed_tokens.weight"][ids[0, :5]]
    assert first_rows.abs().sum() > 0
    _, cut = _chunked(model, ids, 5, labels, bptt_chunks=2)  # truncation: the first chunks get nothing
    assert cut["model.model.embed_tokens.weight"][ids[0, :5]].abs().sum() == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncated_bptt_equals_the_truncated_reference(k):
    model = memory_model()
    ids = _ids(2, 26)
    ref, ref_grads = _reference(model, ids, 4, bptt_chunks=k)
    result, grads = _chunked(model, ids, 4, bptt_chunks=k)
    _assert_equal_grads(grads, ref_grads)
    full, full_grads = _reference(model, ids, 4)
    assert any((full_grads[n] - g).norm() > 1e-6 * g.norm() for n, g in ref_grads.items())  # the cut matters


def test_ablated_state_reads_nothing_and_both_ways_agree():
    model = memory_model()
    ids = _ids(2, 17)
    ref, ref_grads = _reference(model, ids, 4, ablate_state=True)
    result, grads = _chunked(model, ids, 4, ablate_state=True)
    _assert_equal_grads(grads, ref_grads)
    for i in range(len(model.memory)):  # the state is zero: nothing reaches its read or write projections
        for name in ("value.weight", "key.weight", "write_key.weight"):
            assert ref_grads.get(f"memory.{i}.{name}", torch.zeros(1)).abs().sum() == 0
    config_ablated = memory_model(ablate=True)
    assert config_ablated(ids, chunk_size=4).loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)


@pytest.mark.parametrize("weighting", ["tokens", "chunks", "importance"])
def test_loss_weighting_both_ways_and_formulas(weighting):
    model = memory_model()
    ids = _ids(2, 22)
    labels = ids.clone()
    labels[:, 8:12] = -100  # chunk 2 of 4-token chunks... uneven counts per chunk
    imp = ImportanceWeights(keyword=2.0, shift=0.5, loss=1.0, keywords=((int(ids[0, 14]), int(ids[0, 15])),))
    ref, ref_grads = _reference(model, ids, 4, labels, loss_weighting=weighting, importance=imp)
    result, grads = _chunked(model, ids, 4, labels, loss_weighting=weighting, importance=imp)
    _assert_equal_grads(grads, ref_grads)
    # the loss recomputed from per-chunk means and weights, independently of the model code
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    logits = ref.logits.detach()
    token_ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100,
                               reduction="none").view(2, 22)
    spans = [(s, min(s + 4, 22)) for s in range(0, 22, 4)]
    counts = [int((targets[:, s:e] != -100).sum()) for s, e in spans]
    sums = [float(token_ce[:, s:e].sum()) for s, e in spans]
    means = [sm / c if c else 0.0 for sm, c in zip(sums, counts)]
    if weighting == "tokens":
        expected = sum(sums) / sum(counts)
        assert ref.chunk_weights == pytest.approx([c / sum(counts) for c in counts])
    elif weighting == "chunks":
        live = [m for m, c in zip(means, counts) if c]
        expected = sum(live) / len(live)
    else:
        live_mean = sum(m for m, c in zip(means, counts) if c) / sum(1 for c in counts if c)
        scores = []
        for t, (s, e) in enumerate(spans):
            if not counts[t]:
                scores.append(0.0)
                continue
            row = ids[0, s:e].tolist()
            hit = any(row[i:i + 2] == list(imp.keywords[0]) for i in range(len(row) - 1))
            scores.append(1 + 2.0 * hit + 0.5 * ref.topic_shift[t] + max(0.0, means[t] / live_mean - 1))
        expected = sum(sc / sum(scores) * m for sc, m in zip(scores, means))
        assert ref.chunk_weights[3] > ref.chunk_weights[4] or scores[3] <= scores[4]
    assert ref.loss.item() == pytest.approx(expected, rel=1e-10)
    assert sum(ref.chunk_weights) == pytest.approx(1.0)


def test_overlapping_chunks_count_each_target_once():
    """Planned chunks that re-read the end of the previous one: re-read tokens are context only."""
    model = memory_model()
    ids = _ids(2, 20)
    spans = [(0, 8), (5, 14), (12, 20)]
    ref, ref_grads = _reference(model, ids, None, spans=spans)
    result, grads = _chunked(model, ids, None, spans=spans)
    _assert_equal_grads(grads, ref_grads)
    assert ref.num_tokens == result.num_tokens == 2 * 19  # every target once
    assert ref.logits.shape[1] == 20
    # tokens weighting: the plain mean over the document's targets of the owning chunks' logits
    targets = ids[:, 1:]
    expected = F.cross_entropy(ref.logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1))
    assert ref.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="does not follow"):
        model(ids, spans=[(0, 8), (9, 20)])


def test_dropout_draws_the_same_masks_on_recompute():
    model = with_memory(tiny_model("llama", attention_dropout=0.3), MemoryConfig(slots=3, write_dim=8))
    model.train()
    with torch.no_grad():
        for mem in model.memory:
            mem.value.weight.normal_(0, 0.3)
    ids = _ids(2, 15)
    ref, ref_grads = _reference(model, ids, 4)
    _, grads = _chunked(model, ids, 4)
    _assert_equal_grads(grads, ref_grads)


def test_save_and_load(tmp_path):
    model = memory_model(live=True)
    ids = _ids(1, 13)
    before = model(ids, chunk_size=4).logits
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)  # plain transformers loads it
    assert torch.equal(plain.model.embed_tokens.weight, model.model.model.embed_tokens.weight)
    loaded = rollout_dist.MemoryModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.memory_config == model.memory_config
    assert torch.equal(loaded(ids, chunk_size=4).logits, before)
    with pytest.raises(FileNotFoundError, match="memory_config.json"):
        rollout_dist.MemoryModel.from_pretrained(tmp_path / "nothing")


def test_bf16_model_keeps_a_float32_state():
    model = with_memory(tiny_model("llama", dtype=torch.bfloat16), MemoryConfig(slots=2, write_dim=8))
    carry = model(_ids(1, 12), chunk_size=4).carry
    assert all(s.dtype == torch.float32 for s in carry.slots)
    assert all(torch.isfinite(s).all() for s in carry.slots)
    with pytest.raises(ValueError, match="state_dtype"):
        MemoryConfig(state_dtype="float16")
