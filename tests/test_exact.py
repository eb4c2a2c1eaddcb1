"""Exact rollout vs the full-sequence HF forward/backward on the same model."""
import pytest
import torch

from rollout_dist import ExactRollout, chunked_forward_backward
from tests.helpers import (VOCAB, grads_of, reference_loss_and_grads, tiny_model, total_rel_error,
                           worst_rel_error)

F64_GRAD_TOL = 1e-9
F64_LOSS_TOL = 1e-12


# issue 4: every parity test of the foundation holds with each optimisation switched on (CPU versions of them:
# the split kernels in plain torch, K/V and dK/dV offload with synchronous copies, the vocabulary-tiled head)
OPTIMISATIONS = {
    "plain": {},
    "split+keep": {"attention": "math", "keep_attention": True},
    "split+keep_last9": {"attention": "math", "keep_attention": True, "keep_tokens": 9},
    "offload_kv": {"offload": "kv"},
    "offload_all": {"offload": "all"},
    "vocab_tile": {"vocab_tile": 7},
    "all_on": {"attention": "math", "keep_attention": True, "offload": "all", "vocab_tile": 7},
}


def _check(model, ids, labels, chunk_size, grad_tol, loss_tol, **opts):
    ref_loss, ref_grads = reference_loss_and_grads(model, ids, labels)
    result = chunked_forward_backward(model, ids, chunk_size=chunk_size, labels=labels, **opts)
    worst, name = worst_rel_error(grads_of(model), ref_grads)
    assert worst <= grad_tol, f"chunk_size={chunk_size}: {name} gradient off by {worst:.3e}"
    assert abs(result.loss - ref_loss) <= loss_tol * abs(ref_loss), (result.loss, ref_loss)
    target = (labels if labels is not None else ids)[:, 1:]
    assert result.num_tokens == int((target != -100).sum())
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("opts", OPTIMISATIONS.values(), ids=OPTIMISATIONS.keys())
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_float64_every_chunk_size_ragged_batch2_ignored_labels(family, opts):
    model = tiny_model(family)
    T = 23  # prime: every chunk size below T leaves a ragged last chunk
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 3:8] = -100
    labels[1, -4:] = -100
    for chunk_size in list(range(1, T + 1)) + [T + 5]:
        result = _check(model, ids, labels, chunk_size, F64_GRAD_TOL, F64_LOSS_TOL, **opts)
        assert result.num_chunks == -(-T // chunk_size)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
])
@pytest.mark.parametrize("opts", [{}, OPTIMISATIONS["all_on"]], ids=["plain", "all_on"])
def test_float64_rope_scaling_keeps_global_positions(rope, opts):
    model = tiny_model("llama", rope_parameters=rope)
    assert model.config.rope_parameters["rope_type"] == rope["rope_type"]
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(2))
    for chunk_size in (3, 8, 40):
        _check(model, ids, None, chunk_size, F64_GRAD_TOL, F64_LOSS_TOL, **opts)


@pytest.mark.parametrize("opts", [{}, {"offload": "all", "vocab_tile": 7}], ids=["plain", "offload+tile"])
def test_float64_mistral_sliding_window_shorter_than_document(opts):
    model = tiny_model("mistral", sliding_window=6)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    for chunk_size in (1, 4, 7, 30):
        _check(model, ids, None, chunk_size, F64_GRAD_TOL, F64_LOSS_TOL, **opts)


@pytest.mark.parametrize("opts", [{}, OPTIMISATIONS["all_on"]], ids=["plain", "all_on"])
def test_float64_tied_embeddings_and_attention_bias(opts):
    model = tiny_model("llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(4))
    for chunk_size in (2, 5):
        _check(model, ids, None, chunk_size, F64_GRAD_TOL, F64_LOSS_TOL, **opts)


@pytest.mark.parametrize("opts", [{}, OPTIMISATIONS["all_on"]], ids=["plain", "all_on"])
def test_float32_within_1e_5(opts):
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    for chunk_size in (1, 7, 16, 64):
        _check(model, ids, None, chunk_size, 1e-5, 1e-6, **opts)


def test_grads_accumulate_into_existing_grads():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(6))
    _, ref = reference_loss_and_grads(model, ids)
    chunked_forward_backward(model, ids, chunk_size=4)
    chunked_forward_backward(model, ids, chunk_size=5)
    doubled = {n: 2 * g for n, g in ref.items()}
    worst, name = worst_rel_error(grads_of(model), doubled)
    assert worst <= F64_GRAD_TOL, (name, worst)


def test_loss_normalizer_scales_gradient_not_reported_loss():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(7))
    ref_loss, ref = reference_loss_and_grads(model, ids)
    result = chunked_forward_backward(model, ids, chunk_size=4, loss_normalizer=4 * 16)
    assert abs(result.loss - ref_loss) <= F64_LOSS_TOL * ref_loss
    worst, name = worst_rel_error(grads_of(model), {n: g / 4 for n, g in ref.items()})
    assert worst <= F64_GRAD_TOL, (name, worst)


@pytest.mark.parametrize("offload", ["none", "all"])
def test_dropout_recompute_replays_the_same_random_stream(offload):
    model = tiny_model("llama", attention_dropout=0.3, num_hidden_layers=3)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(8))
    engine = ExactRollout(chunk_size=6, verify_recompute=True, offload=offload)
    torch.manual_seed(123)
    first = engine.run(model, ids)
    mismatch = engine.last_state.recompute_mismatch
    # K/V of layers 1.. depend on layer-0 attention dropout; every filled chunk x layer x (K, V) was compared
    assert len(mismatch) == 4 * 3  # 5 chunks, the last is never stored; 3 layers
    assert max(mismatch) == 0.0, mismatch
    g1 = grads_of(model)
    model.zero_grad(set_to_none=True)
    # the same seed gives the same loss and gradients; dropout is really active (a different seed differs)
    torch.manual_seed(123)
    again = engine.run(model, ids)
    assert again.loss == first.loss
    assert all(torch.equal(g1[n], g) for n, g in grads_of(model).items())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    other = engine.run(model, ids)
    assert other.loss != first.loss
    model.zero_grad(set_to_none=True)
    model.eval()
    plain_loss, _ = reference_loss_and_grads(model, ids)
    assert first.loss != plain_loss


def test_dropout_gradient_matches_finite_difference_of_the_same_stream():
    """With dropout on, the rollout's gradient is the true gradient of the loss it reports (fixed stream).

    HF's RMSNorm and RoPE compute in float32 even in a float64 model, so the loss carries ~1e-9 noise: a step
    of 1e-3 keeps the central difference well above it (its own error is O(eps^2)).
    """
    model = tiny_model("llama", attention_dropout=0.2)
    model.train()
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(9))
    engine = ExactRollout(chunk_size=4)
    torch.manual_seed(5)
    engine.run(model, ids)
    param = model.model.layers[0].self_attn.q_proj.weight
    direction = torch.randn_like(param)
    analytic = (param.grad * direction).sum().item()
    eps = 1e-3
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            param.add_(sign * eps * direction)
        torch.manual_seed(5)
        losses.append(engine.run(model, ids).loss)
        with torch.no_grad():
            param.sub_(sign * eps * direction)
    numeric = (losses[0] - losses[1]) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic), (numeric, analytic)


@pytest.mark.parametrize("bad,match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-3), "chunk_size"),
    (dict(chunk_size=4, ids=torch.tensor([[5]])), "at least 2 tokens"),
    (dict(chunk_size=4, ids=torch.tensor([[5, VOCAB]])), "outside the model's vocabulary"),
    (dict(chunk_size=4, ids=torch.tensor([5, 6, 7])), r"\(batch, tokens\)"),
    (dict(chunk_size=4, labels=torch.full((1, 9), -100)), "all labels are -100"),
    (dict(chunk_size=4, labels=torch.full((1, 9), VOCAB)), f"label {VOCAB} is neither -100"),
    (dict(chunk_size=4, labels=torch.full((1, 9), -5)), "label -5 is neither -100"),
])
def test_bad_input_is_named(bad, match):
    model = tiny_model("llama")
    ids = bad.pop("ids", torch.randint(0, VOCAB, (1, 9)))
    with pytest.raises(ValueError, match=match):
        chunked_forward_backward(model, ids, **bad)


def test_unsupported_model_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="model_type='gpt2'"):
        chunked_forward_backward(model, torch.randint(0, 50, (1, 8)), chunk_size=4)


def test_model_attention_setting_is_restored():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    chunked_forward_backward(model, torch.randint(0, VOCAB, (1, 9)), chunk_size=4)
    assert model.config._attn_implementation == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 flash-attention path needs a CUDA GPU")
@pytest.mark.parametrize("attention,keep,keep_tokens", [("sdpa", False, 0), ("cudnn", False, 0), ("flash", False, 0),
                                                         ("cudnn", True, 0), ("cudnn", True, 400)])
def test_bf16_gpu_error_no_larger_than_full_sequence_bf16(attention, keep, keep_tokens):
    """bf16 chunked vs an fp32 reference: error at most 1.5x that of full-sequence bf16 (same weights)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model32 = tiny_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512,
                         num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
                         max_position_embeddings=4096).cuda()
    ids = torch.randint(0, VOCAB, (2, 1000), generator=torch.Generator().manual_seed(10)).cuda()
    ref_loss, ref = reference_loss_and_grads(model32, ids)
    model16 = tiny_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512,
                         num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
                         max_position_embeddings=4096).cuda().to(torch.bfloat16)
    full_loss, full = reference_loss_and_grads(model16, ids)
    full_err = total_rel_error(full, ref)
    for chunk_size in (128, 333):
        result = chunked_forward_backward(model16, ids, chunk_size=chunk_size, attention=attention,
                                          keep_attention=keep, keep_tokens=keep_tokens)
        err = total_rel_error(grads_of(model16), ref)
        model16.zero_grad(set_to_none=True)
        assert err <= 1.5 * full_err, f"chunk {chunk_size}: {err:.3e} vs full bf16 {full_err:.3e}"
        assert abs(result.loss - ref_loss) <= 1.5 * abs(full_loss - ref_loss) + 1e-3


@pytest.mark.parametrize("keep,keep_tokens", [(False, 0), (True, 0), (True, 10)], ids=["off", "all", "last10"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float64_split_attention_and_kept_outputs(family, keep, keep_tokens):
    """The split kernel path (prefix + diagonal merged by log-sum-exp, backward from the merged statistics),
    in plain torch on CPU; with ``keep_attention`` the backward pass reuses the fill pass's outputs (with
    ``keep_tokens``, only those of the chunks starting in the last ``keep_tokens`` tokens)."""
    from rollout_dist.model import split_attention as sa
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(12))
    ref_loss, ref = reference_loss_and_grads(model, ids)
    calls = []
    real = sa._forward_kernel
    try:
        sa._forward_kernel = lambda *a, **k: calls.append(1) or real(*a, **k)
        for chunk_size in (1, 5, 8, 23):
            calls.clear()
            engine = ExactRollout(chunk_size, attention="math", keep_attention=keep, verify_recompute=True,
                                  keep_tokens=keep_tokens)
            result = engine.run(model, ids)
            worst, name = worst_rel_error(grads_of(model), ref)
            assert worst <= F64_GRAD_TOL, (chunk_size, name, worst)
            assert abs(result.loss - ref_loss) <= F64_LOSS_TOL * ref_loss
            model.zero_grad(set_to_none=True)
            starts = list(range(0, 23, chunk_size))

            def parts(s):  # a diagonal part, and a prefix part for every chunk but the first
                return 1 if s == 0 else 2
            # per layer: the fill pass (all but the last chunk) and the recompute (the chunks whose outputs were
            # not kept, and the last one, never stored)
            kept = [s for s in starts[:-1] if keep and s >= 23 - (keep_tokens or 23)]
            per_layer = sum(parts(s) for s in starts[:-1]) + sum(parts(s) for s in starts if s not in kept)
            assert len(calls) == 2 * per_layer, (chunk_size, keep, len(calls))
            assert not engine.last_state.attention_cache  # every kept output was used and released
    finally:
        sa._forward_kernel = real
