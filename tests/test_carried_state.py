"""CarriedState: a rollout stopped at a chunk boundary, its state saved, loaded into a fresh state and continued,
gives the uninterrupted result bit for bit; the canonical layout does not depend on where the state lives; the
fill-only pass over a kept state gives HF's logits and K/V."""
import io

import pytest
import torch

from rollout_dist import Boundary, ExactRollout, StreamKey
from rollout_dist.model.carried_state import LAYOUT_VERSION
from tests.helpers import VOCAB, grads_of, tiny_model

KEY = StreamKey(seed=11, step=3, document=5)


def _saved_and_loaded(state_dict):
    """Through bytes, as a snapshot would store it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def _model(dropout: float = 0.2):
    model = tiny_model("llama", num_hidden_layers=4, attention_dropout=dropout)
    model.train()  # dropout on: the continued run must draw the same masks
    return model


def _uninterrupted(model, ids, rollout_kw):
    rollout = ExactRollout(4, **rollout_kw)
    result = rollout.run(model, ids, stream=KEY)
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return result, grads


# 23 tokens in chunks of 4: 6 chunks, 5 filled; stops in the fill pass and in the backward pass
STOPS = [Boundary("fill", 0), Boundary("fill", 2), Boundary("fill", 5), Boundary("backward", 0),
         Boundary("backward", 1), Boundary("backward", 4)]
LAYOUTS = {"device": {}, "offload_kv": {"offload": "kv"}, "offload_all": {"offload": "all"},
           "offload_all_first_layer": {"offload": "all", "offload_layers": 1},
           "kept_outputs": {"attention": "math", "keep_attention": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stop", STOPS, ids=lambda b: f"{b.phase}{b.chunks}")
def test_stopped_saved_loaded_and_continued_equals_uninterrupted(layout, stop):
    model = _model(0.0 if LAYOUTS[layout].get("keep_attention") else 0.2)  # kept outputs: split kernels, no dropout
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(31))
    expected, expected_grads = _uninterrupted(model, ids, LAYOUTS[layout])

    first = ExactRollout(4, **LAYOUTS[layout])
    state = first.new_state(model, 2, 23)
    partial = first.run(model, ids, state=state, stream=KEY, stop_at=stop)
    assert not partial.complete
    assert state.boundary.phase == stop.phase and state.boundary.chunks == stop.chunks
    saved = _saved_and_loaded(state.state_dict())
    state.close()
    grads_so_far = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}

    second = ExactRollout(4, **LAYOUTS[layout])  # a fresh rollout (and host pool): nothing carried but the dict
    fresh = second.new_state(model, 2, 23)
    fresh.load_state_dict(saved)
    assert fresh.boundary == state.boundary
    for n, p in model.named_parameters():  # parameter gradients are the optimizer's, restored by the caller
        p.grad = grads_so_far[n]
    result = second.run(model, ids, state=fresh)  # the stream key comes back with the state
    fresh.close()
    assert result.complete and result.loss_sum == expected.loss_sum and result.loss == expected.loss
    got = grads_of(model)
    assert all(torch.equal(got[n], g) for n, g in expected_grads.items()), layout


def test_canonical_layout_is_the_same_wherever_the_state_lives():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(32))
    dicts = {}
    for name, kw in (("device", {}), ("kv", {"offload": "kv"}), ("all2", {"offload": "all", "offload_layers": 2})):
        for stop in (Boundary("fill", 3), Boundary("backward", 2)):
            rollout = ExactRollout(4, **kw)
            state = rollout.new_state(model, 1, 19)
            rollout.run(model, ids, state=state, stream=KEY, stop_at=stop)
            dicts[name, stop.phase] = state.state_dict()
            state.close()
            model.zero_grad(set_to_none=True)
    fill, back = dicts["device", "fill"], dicts["device", "backward"]
    assert int(fill["version"]) == LAYOUT_VERSION and int(fill["phase"]) == 0 and int(fill["chunks"]) == 3
    assert int(fill["position"]) == 12 and torch.equal(fill["positions"], torch.arange(12)[None])
    assert fill["layers"].tolist() == [0, 1, 2, 3] and fill["stream"].tolist() == [11, 3, 5]
    assert fill["layer.2.key"].shape == (1, 12, 2, 8) and "layer.0.dkey" not in fill and "loss_sum" not in fill
    # 5 chunks; two run backward (16..19 and 12..16): K/V and dK/dV of [0, 12) are what is left to carry
    assert int(back["phase"]) == 1 and int(back["position"]) == 12 and back["layer.3.dvalue"].shape == (1, 12, 2, 8)
    assert float(back["loss_sum"]) > 0 and back["layer.0.dkey"].abs().sum() > 0
    for name in ("kv", "all2"):
        for phase in ("fill", "backward"):
            mine, ref = dicts[name, phase], dicts["device", phase]
            assert mine.keys() == ref.keys()
            assert all(torch.equal(mine[k], ref[k]) for k in ref), (name, phase)


def test_loading_a_state_of_another_shape_is_refused_with_the_reason():
    model = _model()
    rollout = ExactRollout(4)
    state = rollout.new_state(model, 1, 12)
    rollout.run(model, torch.randint(0, VOCAB, (1, 12)), state=state, stream=KEY, stop_at=Boundary("fill", 1))
    saved = state.state_dict()
    other = ExactRollout(4).new_state(tiny_model("llama", num_hidden_layers=3), 1, 12)
    with pytest.raises(ValueError, match=r"decoder layers \[0, 1, 2, 3\], this one \[0, 1, 2\]"):
        other.load_state_dict(saved)
    short = rollout.new_state(model, 1, 2)
    with pytest.raises(ValueError, match="holds 4 tokens, more than this state's 2"):
        short.load_state_dict(saved)
    with pytest.raises(ValueError, match="layout version 7"):
        rollout.new_state(model, 1, 12).load_state_dict({**saved, "version": torch.tensor(7)})
    continued = rollout.new_state(model, 1, 12)
    continued.load_state_dict(saved)
    with pytest.raises(ValueError, match="not a boundary of this document's chunks"):
        ExactRollout(3).run(model, torch.randint(0, VOCAB, (1, 12)), state=continued)
    with pytest.raises(ValueError, match="stop_at needs a state of the caller's"):
        rollout.run(model, torch.randint(0, VOCAB, (1, 12)), stop_at=Boundary("fill", 1))


@pytest.mark.parametrize("family,offload", [("qwen2", "none"), ("llama", "kv"), ("mistral", "all")])
def test_fill_only_pass_over_a_kept_state_gives_hf_logits_and_cache(family, offload):
    model = tiny_model(family, num_hidden_layers=3)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    rollout = ExactRollout(5, offload=offload)
    state = rollout.new_state(model, 2, 32)
    first = rollout.fill(model, ids[:, :13], state)  # chunks 0..4, 5..9, 10..12
    assert first.shape == (2, 3, VOCAB)
    torch.testing.assert_close(first, ref.logits[:, 10:13], rtol=0, atol=1e-12)
    last = rollout.fill(model, ids[:, 13:], state)  # continues at position 13: chunks 13..17, 18..20
    torch.testing.assert_close(last, ref.logits[:, 18:21], rtol=0, atol=1e-12)
    assert state.boundary == Boundary("fill", 5, 21)
    saved = state.state_dict()
    for layer in range(3):
        hf = ref.past_key_values.layers[layer]
        torch.testing.assert_close(saved[f"layer.{layer}.key"], hf.keys.transpose(1, 2), rtol=0, atol=1e-12)
        torch.testing.assert_close(saved[f"layer.{layer}.value"], hf.values.transpose(1, 2), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="more do not fit"):
        rollout.fill(model, ids, state)
    state.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="side-stream copies to pinned host memory need a CUDA GPU")
@pytest.mark.parametrize("offload,layers", [("kv", 0), ("all", 0), ("all", 3)])
def test_gpu_offloaded_state_dict_waits_for_its_copies(offload, layers):
    """On the GPU the K/V reach the host on a side stream; ``state_dict`` must wait for them.  The fill pass is
    deterministic, so at a fill boundary an offloaded state holds exactly the device state's bytes."""
    model = tiny_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_key_value_heads=2, num_hidden_layers=5, max_position_embeddings=8192)
    model = model.cuda().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 4000), generator=torch.Generator().manual_seed(34)).cuda()
    dicts = []
    for kw in ({}, {"offload": offload, "offload_layers": layers}):
        rollout = ExactRollout(512, attention="cudnn", **kw)
        state = rollout.new_state(model, 1, 4000)
        rollout.run(model, ids, state=state, stream=KEY, stop_at=Boundary("fill", 7))
        dicts.append(state.state_dict())
        state.close()
    assert dicts[0].keys() == dicts[1].keys() and int(dicts[0]["position"]) == 3584
    assert all(torch.equal(dicts[1][k], v) for k, v in dicts[0].items())
