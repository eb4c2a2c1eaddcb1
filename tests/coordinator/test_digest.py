"""Digest records and fingerprints, against independent references: xxhash of the raw bytes, the block checksum
written out with Python integers, and the canonical layout of ``CarriedState.state_dict``."""
import numpy as np
import pytest
import torch
import xxhash

from rollout_dist.coordinator import digest as dg
from rollout_dist.engine import ExactRollout
from rollout_dist.engine.streams import StreamKey
from rollout_dist.model.carried_state import Boundary
from tests.helpers import tiny_model


def test_record_round_trips_and_refuses_damage():
    d = dg.Digest(dg.STATE, rank=3, step=7, name="layer.2.value", dp_rank=1, stage=1, document=42, chunk=5,
                  layer=2, phase=0, hash=2**64 - 5, hash_alg=dg.HASH_BLOCK64, t_ns=123456789,
                  indices=np.array([4, 1, 9]), values=np.array([-3.5, 2.25, 1e-30]))
    raw = d.pack()
    assert raw[:4] == b"RDDG" and raw[4] == 1  # magic and layout version, as docs/coordinator.md documents
    assert len(raw) == dg.HEADER.size + len("layer.2.value") + 3 * 16 + 8
    back, end = dg.unpack_one(raw)
    assert end == len(raw)
    for field in ("kind", "rank", "step", "name", "dp_rank", "stage", "document", "chunk", "layer", "phase", "hash",
                  "hash_alg", "t_ns"):
        assert getattr(back, field) == getattr(d, field), field
    assert back.indices.tolist() == [4, 1, 9] and back.values.tolist() == [-3.5, 2.25, 1e-30]
    assert [r.name for r in dg.unpack_all(raw + dg.Digest(dg.STEP_END, 0, 7).pack())] == ["layer.2.value", ""]
    for i in (0, 4, 30, len(raw) - 20, len(raw) - 1):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(dg.DigestFormatError):
            dg.unpack_one(bytes(bad))
    with pytest.raises(dg.DigestFormatError, match="truncated"):
        dg.unpack_one(raw[:-3])


def _reference_block_checksum(t: torch.Tensor, blocks: int) -> list[int]:
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 4)
    words = [int.from_bytes(raw[i:i + 4], "little", signed=True) for i in range(0, len(raw), 4)]
    per = max(1, -(-len(words) // blocks))
    words += [0] * (per * blocks - len(words))

    def wrap32(x):
        x %= 2**32
        return x - 2**32 if x >= 2**31 else x
    return [sum(wrap32(w * (2 * j + 1)) for j, w in enumerate(words[b * per:(b + 1) * per])) for b in range(blocks)]


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (3, 7, 5)), (torch.float32, (64, 33)),
                                         (torch.float64, (5,)), (torch.bfloat16, (1,))])
def test_block_checksum_matches_its_definition_and_sees_every_flipped_bit(dtype, shape):
    torch.manual_seed(0)
    t = (torch.randn(shape) * 100).to(dtype)
    got = dg.block_checksum(t, blocks=8)
    assert got.tolist() == _reference_block_checksum(t, 8)
    words = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).reshape(-1)
    for i in range(min(words.numel(), 6)):
        for bit in range(8 * t.element_size()):
            flipped = words.clone()
            flipped[i] ^= (1 << bit) if bit < 8 * t.element_size() - 1 else -(1 << bit)
            assert not torch.equal(dg.block_checksum(flipped.view(dtype).view(shape), 8), got), (i, bit)


def test_cpu_hash_is_xxh64_of_the_canonical_bytes_and_topk_is_by_magnitude():
    """A fill pass's STATE digest of layer L and chunk [s, e) hashes exactly the bytes of
    ``state_dict()["layer.L.key"][:, s:e]``: the observer sees the canonical layout."""
    model = tiny_model(dtype=torch.float32)
    rollout = ExactRollout(chunk_size=8)
    seen = {}

    class Observer:
        def on_chunk_kv(self, phase, layer, start, end, key, value, stored_key, stored_value):
            if phase == "fill":
                seen[(layer, start, end)] = (dg.Reduction(key, 4), dg.Reduction(value))

    rollout.state_observer = Observer()
    ids = torch.randint(0, 101, (1, 29))
    state = rollout.new_state(model, 1, 29)
    rollout.run(model, ids, state=state, stream=StreamKey(0, 0, 0), backward=lambda loss: None,
                stop_at=Boundary("fill", 3))
    sd = state.state_dict()
    assert sorted({(s, e) for _, s, e in seen}) == [(0, 8), (8, 16), (16, 24)]
    for (layer, s, e), (kred, vred) in seen.items():
        key = sd[f"layer.{layer}.key"][:, s:e].contiguous()
        alg, h, idx, vals = kred.finish()
        assert alg == dg.HASH_XXH64 and h == xxhash.xxh64_intdigest(key.numpy().tobytes())
        assert vred.finish()[1] == xxhash.xxh64_intdigest(sd[f"layer.{layer}.value"][:, s:e].contiguous().numpy())
        flat = key.reshape(-1).double()
        assert vals.tolist() == flat[idx].tolist()
        assert abs(vals[-1]) >= flat.abs().sort(descending=True).values[3].item()
    state.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the block checksum's device path)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gpu_block_checksum_equals_the_cpu_one(dtype):
    torch.manual_seed(0)
    t = torch.randn(3, 1000, 4, 64).to(dtype)
    assert dg.block_checksum(t.cuda()).cpu().tolist() == dg.block_checksum(t).tolist()
    red = dg.Reduction(t.cuda(), 8)
    red.to_host()
    torch.cuda.synchronize()
    alg, h, idx, vals = red.finish()
    assert alg == dg.HASH_BLOCK64 and h == xxhash.xxh64_intdigest(dg.block_checksum(t).numpy().tobytes())
    assert vals.tolist() == t.reshape(-1)[torch.from_numpy(idx)].double().tolist()


@pytest.mark.parametrize("n,k", [(64 * 1024 + 1, 8), (300_000, 16), (1024 * 70, 1), (100_003, 200)])
def test_two_stage_topk_equals_a_full_selection(n, k):
    torch.manual_seed(n)
    t = torch.randn(n, dtype=torch.float64) * torch.rand(n, dtype=torch.float64) ** 4
    t[-1] = 50.0  # the tail outside whole groups can hold the largest entry
    t[12345] = -60.0
    idx, vals = dg.topk(t.to(torch.float32), k)
    ref = torch.topk(t.float().abs(), k).indices
    assert idx.tolist() == ref.tolist()
    assert vals.tolist() == t.float()[ref].double().tolist()
