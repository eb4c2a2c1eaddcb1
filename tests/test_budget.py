"""The memory model used to check a document fits before its rollout (rollout_dist/engine/budget.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_dist.engine.budget import (GiB, PeakEstimate, activation_bytes_per_token, estimate_peak, fit_advice,
                                        pick_chunk_size, state_bytes_per_token)
from rollout_dist.model import CausalLMAdapter
from tests.helpers import tiny_model

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4)


def _adapter(layers, **shape):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape)).to(torch.bfloat16)
    return CausalLMAdapter(model)


def test_state_bytes_per_token_match_the_measured_slopes_for_tinyllama():
    adapter = _adapter(22, **TINYLLAMA)
    # H200 slopes in docs/performance.md: 45,056 B/token measured; 138,000 measured with kept outputs
    assert state_bytes_per_token(adapter) == 45_056
    assert state_bytes_per_token(adapter, keep_attention=True) == 137_984
    assert state_bytes_per_token(adapter, "kv") == 24_576
    assert state_bytes_per_token(adapter, "all") == 4_096
    # 20 of 22 layers offloaded: 2 layers' K/V (1,024 B each) stay, with all their dK/dV too
    assert state_bytes_per_token(adapter, "kv", offload_layers=20) == 24_576 + 2 * 1_024
    assert state_bytes_per_token(adapter, "all", offload_layers=20) == 4_096 + 4 * 1_024


@pytest.mark.parametrize("offload,layers", [("none", 0), ("kv", 0), ("all", 0), ("kv", 2), ("all", 1)])
def test_state_bytes_per_token_equal_what_the_state_allocates(offload, layers):
    adapter = CausalLMAdapter(tiny_model("llama", num_hidden_layers=3))
    state = adapter.new_state(1, 40, offload=offload, offload_layers=layers)
    state.allocate_grads()
    assert state.nbytes == 40 * state_bytes_per_token(adapter, offload, offload_layers=layers)


def test_partly_kept_outputs_are_counted_for_the_kept_tokens_only():
    adapter = _adapter(22, **TINYLLAMA)
    T, keep = 1_048_576, 393_216
    base = estimate_peak(adapter, T, 16384, fixed=0, activation_per_token=0)
    part = estimate_peak(adapter, T, 16384, fixed=0, activation_per_token=0, keep_attention=True, keep_tokens=keep)
    full = estimate_peak(adapter, T, 16384, fixed=0, activation_per_token=0, keep_attention=True)
    assert part.state - base.state == keep * (137_984 - 45_056)
    assert full.state - base.state == T * (137_984 - 45_056)
    longer = estimate_peak(adapter, 1000, 256, fixed=0, activation_per_token=0, keep_attention=True, keep_tokens=T)
    assert longer.state == 1000 * 137_984  # never more than the document


def test_kept_tokens_fitted_to_memory_are_whole_chunks_that_fit():
    from rollout_dist.engine.budget import fit_keep_tokens
    adapter = _adapter(22, **TINYLLAMA)
    args = dict(fixed=int(8.2 * GiB), activation_per_token=1_988_272)
    T, chunk, cap = 1_048_576, 16384, 139 * GiB
    keep = fit_keep_tokens(adapter, T, chunk, cap, **args)
    assert keep % chunk == 0 and 0 < keep < T
    fits = estimate_peak(adapter, T, chunk, keep_attention=True, keep_tokens=keep, **args).total
    over = estimate_peak(adapter, T, chunk, keep_attention=True, keep_tokens=keep + chunk, **args).total
    assert fits <= 0.9 * cap < over
    assert fit_keep_tokens(adapter, 131_072, chunk, cap, **args) == 131_072  # all of a 128K document fit
    assert fit_keep_tokens(adapter, T, chunk, 80 * GiB, **args) == 0  # an H100: not even the state fits


def test_partly_kept_outputs_take_what_the_model_predicts():
    """The outputs the fill pass keeps (before the backward pass consumes them) are the kept tokens' share."""
    from rollout_dist.engine.exact import ExactRollout
    from rollout_dist.engine.budget import kept_bytes_per_token
    model = tiny_model("llama", num_hidden_layers=2).float()  # fp32 outputs, fp32 log-sum-exp, as in bf16
    adapter = CausalLMAdapter(model)
    seen = []
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(3))

    def record(loss):
        if not seen:  # first backward chunk: the fill pass is over, nothing consumed yet but the last chunk's
            seen.append(sum(out.nbytes + lse.nbytes for out, lse, _ in engine._state.attention_cache.values()))
        loss.backward()

    engine = ExactRollout(8, attention="math", keep_attention=True, keep_tokens=20)
    real_new_state = adapter.new_state

    def capture(*a, **k):
        engine._state = real_new_state(*a, **k)
        return engine._state
    CausalLMAdapter.new_state, saved = (lambda self, *a, **k: capture(*a, **k)), CausalLMAdapter.new_state
    try:
        engine.run(model, ids, backward=record)
    finally:
        CausalLMAdapter.new_state = saved
    # chunks start at 0, 8, 16, 24, 32: those at 24 and 32 lie in the last 20 tokens, and the last one (32) is
    # never stored by the fill pass, so 8 tokens' outputs are held
    per_token = 2 * (adapter.hidden_size * 4 + 4 * model.config.num_attention_heads)
    assert seen == [8 * per_token]
    assert kept_bytes_per_token(adapter) == per_token


def test_activation_count_matches_the_per_layer_benchmark_figure():
    """bench/activation_bytes.py counted 90,376 bytes per token per TinyLlama layer (256-token chunk): two more
    layers add twice that; the probe size does not matter; the probe leaves no gradients and no RNG use."""
    counts = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **{**TINYLLAMA, "vocab_size": 320}))
        adapter = CausalLMAdapter(model.to(torch.bfloat16))
        rng = torch.get_rng_state()
        counts[layers] = activation_bytes_per_token(adapter, probe_tokens=16)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in model.parameters())
    assert abs((counts[4] - counts[2]) - 2 * 90_376) <= 0.01 * 2 * 90_376, counts
    assert activation_bytes_per_token(adapter, probe_tokens=48) == counts[4]


def test_estimate_adds_up_and_advice_names_what_to_change():
    adapter = _adapter(22, **TINYLLAMA)
    est = estimate_peak(adapter, 1_048_576, 16384, fixed=8 * GiB, activation_per_token=1_988_272)
    assert est.state == 1_048_576 * 45_056 and est.total == est.fixed + est.state + est.chunk_activations + \
        est.transient
    # H200 probe at 1M tokens, chunk 16384: 91.76 GiB measured (bench/results/2026-11-23_h200_probe_1m.jsonl)
    assert 85 * GiB < est.total < 95 * GiB, est.describe()
    assert fit_advice(est, 139 * GiB, "none", False) is None
    advice = fit_advice(est, 80 * GiB, "none", True)
    assert "exceeds the GPU's 80.0 GiB" in advice and "rollout.offload=kv" in advice
    assert "rollout.keep_attention=false" in advice and "rollout.chunk_size=8192" in advice
    tiled = estimate_peak(adapter, 1_048_576, 16384, fixed=0, activation_per_token=0, vocab_tile=4096)
    assert tiled.chunk_activations == 16384 * 4096 * 12
    assert isinstance(est, PeakEstimate)


def test_chunk_size_is_the_largest_that_fits():
    adapter = _adapter(22, **TINYLLAMA)
    pick = dict(fixed=int(8.2 * GiB), activation_per_token=1_988_272)
    # 139 GiB H200 at 1M tokens: chunk 16384 predicts 90.4 GiB, 32768 about 126.6 GiB (over 90% of 139)
    assert pick_chunk_size(adapter, 1_048_576, 139 * GiB, **pick) == 16384
    assert pick_chunk_size(adapter, 1_048_576, 80 * GiB, **pick) == 4096  # an H100 at 1M
    assert pick_chunk_size(adapter, 1_048_576, 80 * GiB, offload="kv", **pick) == 16384
    assert pick_chunk_size(adapter, 3000, 139 * GiB, **pick) == 2048  # never longer than the document
    assert pick_chunk_size(adapter, 100, 139 * GiB, **pick) == 100
    assert pick_chunk_size(adapter, 4_000_000, 16 * GiB, **pick) == 128  # nothing fits: the smallest


def test_pipeline_stages_are_counted_with_their_chunks_in_flight():
    """A stage's activations are counted on what it holds (before, the probe needed the embedding and the final
    norm of the whole model: every pipeline stage failed it), each stage s of p holds p - s recomputed chunk
    graphs at once in the 1F1B backward, and only the last stage has logits."""
    import torch

    from rollout_dist.engine.budget import chunks_in_flight, logits_bytes_per_token
    from rollout_dist.model import trim_to_stage
    from tests.helpers import tiny_model

    whole = CausalLMAdapter(tiny_model("llama", num_hidden_layers=4, dtype=torch.float32))
    layers = activation_bytes_per_token(whole, layers_only=True)
    stages = []
    for stage in range(2):
        model = tiny_model("llama", num_hidden_layers=4, dtype=torch.float32)
        trim_to_stage(model, stage, [1, 3])
        stages.append(CausalLMAdapter(model))
    s0, s1 = (activation_bytes_per_token(a, layers_only=True) for a in stages)
    # the layers' bytes split over the stages; each stage keeps its own rotary tables besides (a few bytes)
    assert layers <= s0 + s1 <= layers + 64 and 2.5 * s0 < s1 < 3.5 * s0, (layers, s0, s1)
    assert [chunks_in_flight(a) for a in stages] == [2, 1] and chunks_in_flight(whole) == 1
    first, last = (estimate_peak(a, 64, 16, fixed=0) for a in stages)
    act0, act1 = (activation_bytes_per_token(a) for a in stages)
    assert first.chunk_activations == 16 * 2 * act0  # two recomputed chunks alive, no LM head
    assert last.chunk_activations == 16 * (act1 + logits_bytes_per_token(last_adapter := stages[1]))
    assert last_adapter.has_head and not stages[0].has_head
