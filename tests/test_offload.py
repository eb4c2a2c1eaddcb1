"""Carried K/V (and dK/dV) offloaded to host memory: same gradients as full-sequence HF, device state bounded."""
import pytest
import torch

from rollout_dist import ExactRollout, chunked_forward_backward
from rollout_dist.engine.budget import state_bytes_per_token
from rollout_dist.model import CausalLMAdapter
from rollout_dist.model.offload import HostPool, LayerRing, OffloadedKVState, check_host_memory
from tests.helpers import VOCAB, grads_of, reference_loss_and_grads, tiny_model, total_rel_error, worst_rel_error

F64_GRAD_TOL = 1e-9


def _packed_counter(monkeypatch):
    """Counts saved tensors replaced by tokens: the test must fail if the hooks never engage."""
    counts = []
    real = OffloadedKVState.close

    def close(self):
        counts.append(self.packed)
        return real(self)
    monkeypatch.setattr(OffloadedKVState, "close", close)
    return counts


# 4 layers with 2 slots: every layer's slot is reused by another layer within each chunk, so staging order bugs
# (a stale or evicted layer) change the gradients
# layers=1 and 3: the first layers go through the ring, the later ones keep their state on the device
@pytest.mark.parametrize("mode,layers", [("kv", 0), ("all", 0), ("kv", 3), ("all", 1)])
@pytest.mark.parametrize("attention,keep", [("math", False), ("math", True), ("sdpa", False)])
def test_float64_offloaded_state_matches_full_sequence(mode, layers, attention, keep, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(21))
    labels = ids.clone()
    labels[0, 4:9] = -100
    ref_loss, ref = reference_loss_and_grads(model, ids, labels)
    packed = _packed_counter(monkeypatch)
    for chunk_size in (1, 4, 7, 23):
        engine = ExactRollout(chunk_size, attention=attention, keep_attention=keep, offload=mode,
                              verify_recompute=True, offload_layers=layers)
        result = engine.run(model, ids, labels)
        worst, name = worst_rel_error(grads_of(model), ref)
        assert worst <= F64_GRAD_TOL, (mode, chunk_size, name, worst)
        assert abs(result.loss - ref_loss) <= 1e-12 * ref_loss
        assert max(engine.last_state.recompute_mismatch, default=0.0) == 0.0
        assert engine.last_state.offloaded == (layers or 4)
        model.zero_grad(set_to_none=True)
    assert all(n > 0 for n in packed), packed  # saved K/V views were swapped for tokens on every run


def test_qwen2_and_mistral_sliding_window_offloaded():
    for family, extra in (("qwen2", {}), ("mistral", {"sliding_window": 5})):
        model = tiny_model(family, num_hidden_layers=3, **extra)
        ids = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(22))
        _, ref = reference_loss_and_grads(model, ids)
        chunked_forward_backward(model, ids, chunk_size=4, offload="all", attention="sdpa")
        worst, name = worst_rel_error(grads_of(model), ref)
        assert worst <= F64_GRAD_TOL, (family, name, worst)


def test_packed_segments_offloaded_equal_device_state():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(23))
    segments = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4])
    chunked_forward_backward(model, ids, chunk_size=6, segment_ids=segments)
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)
    chunked_forward_backward(model, ids, chunk_size=6, segment_ids=segments, offload="kv")
    assert total_rel_error(grads_of(model), expected) <= 1e-12


def test_device_state_does_not_grow_with_the_document():
    """Offloaded K/V: device bytes are the slots (2 layers' worth), not all layers; host holds the rest."""
    model = tiny_model("llama", num_hidden_layers=6)
    adapter = CausalLMAdapter(model)
    per_layer = 2 * 64 * 2 * 8 * 8  # (B=2, T=64, kv_heads=2, head_dim=8) float64, one of K or V
    device = adapter.new_state(2, 64)
    kv = adapter.new_state(2, 64, offload="kv")
    full = adapter.new_state(2, 64, offload="all")
    for state in (device, kv, full):
        state.allocate_grads()
    assert device.nbytes == 4 * 6 * per_layer  # K, V, dK, dV of 6 layers
    assert kv.nbytes == 2 * 2 * per_layer + 2 * 6 * per_layer and kv.host_bytes == 2 * 6 * per_layer
    assert full.nbytes == 4 * 2 * per_layer and full.host_bytes == 4 * 6 * per_layer
    # the first 4 of 6 layers offloaded: the other 2 keep K/V (and with all, dK/dV) on the device
    kv4 = adapter.new_state(2, 64, offload="kv", offload_layers=4)
    full4 = adapter.new_state(2, 64, offload="all", offload_layers=4)
    for state in (kv4, full4):
        state.allocate_grads()
    assert kv4.nbytes == kv.nbytes + 2 * 2 * per_layer and kv4.host_bytes == 2 * 4 * per_layer
    assert full4.nbytes == full.nbytes + 4 * 2 * per_layer and full4.host_bytes == 4 * 4 * per_layer


def test_ring_keeps_the_slot_in_use_and_restages_evicted_layers():
    ring = LayerRing(num_layers=3, shape=(1, 10, 1, 2), dtype=torch.float64, device=torch.device("cpu"))
    for layer, host in enumerate(ring.host):
        host.copy_(torch.full_like(host, float(layer)))
    slot0, buf0 = ring.acquire(0, 10)
    ring.prefetch(1, 10)
    ring.prefetch(2, 10)  # evicts the prefetched layer 1, never the slot in use
    assert ring.layer_in(slot0) == (0, 10) and float(buf0[0, 9, 0, 0]) == 0.0
    _, buf1 = ring.acquire(1, 6)  # restaged from the host
    assert float(buf1[0, 5, 0, 0]) == 1.0
    buf1[:, 6:8] = 7.0
    ring.extend(ring.slot_of(buf1), 8)
    ring.write(ring.slot_of(buf1), 6, 8)
    assert float(ring.host[1][0, 7, 0, 0]) == 7.0 and float(ring.host[1][0, 8, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="at least 2 slots"):
        LayerRing(num_layers=3, shape=(1, 4, 1, 2), dtype=torch.float64, device=torch.device("cpu"), slots=1)


def test_offload_larger_than_host_memory_is_refused_with_figures(monkeypatch):
    with pytest.raises(MemoryError, match=r"needs 100.0 GiB of host memory but 64.0 GiB are available"):
        check_host_memory(100 * 2**30, "rollout.offload=all", available=64 * 2**30)
    check_host_memory(10 * 2**30, "rollout.offload=kv", available=64 * 2**30)
    model = tiny_model("llama")
    monkeypatch.setattr("rollout_dist.model.offload.available_host_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="rollout.offload=kv for 1 x 4096 tokens and 2 layers"):
        CausalLMAdapter(model).new_state(1, 4096, offload="kv")


GiB = 2**30


def fake_host(tmp_path, monkeypatch, *, available_kb=None, v2=None, v1=None, cgroup="/job/rank"):
    """/proc/meminfo (MemAvailable in kB), /proc/self/cgroup and a cgroup tree under tmp_path: ``v2`` / ``v1``
    {relative cgroup directory: (limit, usage)} with limit "max" or bytes; the process's cgroup is ``cgroup``."""
    from rollout_dist.model import offload
    tmp_path.mkdir(parents=True, exist_ok=True)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32505856 kB\n" + (f"MemAvailable:   {available_kb} kB\n"
                                                          if available_kb is not None else ""))
    (tmp_path / "self_cgroup").write_text(f"4:memory:{cgroup}\n0::{cgroup}\n")
    root = tmp_path / "cgroup"
    for base, files, tree in (("", ("memory.max", "memory.current"), v2 or {}),
                              ("memory", ("memory.limit_in_bytes", "memory.usage_in_bytes"), v1 or {})):
        for rel, (limit, usage) in tree.items():
            d = root / base / rel
            d.mkdir(parents=True, exist_ok=True)
            (d / files[0]).write_text(f"{limit}\n")
            (d / files[1]).write_text(f"{usage}\n")
    monkeypatch.setattr(offload, "MEMINFO", str(meminfo))
    monkeypatch.setattr(offload, "PROC_CGROUP", str(tmp_path / "self_cgroup"))
    monkeypatch.setattr(offload, "CGROUP_ROOT", str(root))
    return offload


def test_host_memory_reads_the_cgroup_limit_before_meminfo(tmp_path, monkeypatch):
    """The multi-GPU machines' MemTotal starts near 31 GiB of the 256-560 GiB allowed: the cgroup limit (less
    its usage), v2 or v1, of the process's cgroup or any ancestor, decides where one is set."""
    off = fake_host(tmp_path / "a", monkeypatch, available_kb=30 * 2**20,
                    v2={"": ("max", 0), "job": (512 * GiB, 12 * GiB)})
    assert off.available_host_bytes() == 500 * GiB
    assert "memory cgroup limit of 512.0 GiB, 12.0 GiB used" in off.host_memory()[1]
    # v1, the tightest of the process's cgroup and its ancestors; "no limit" is 2^63-1 rounded to a page
    off = fake_host(tmp_path / "b", monkeypatch, available_kb=30 * 2**20,
                    v1={"": (9223372036854771712, GiB), "job": (64 * GiB, 4 * GiB), "job/rank": (100 * GiB, 0)})
    assert off.available_host_bytes() == 60 * GiB
    off = fake_host(tmp_path / "c", monkeypatch, available_kb=30 * 2**20, v2={"": ("max", GiB)},
                    v1={"": (9223372036854771712, GiB)})
    assert off.host_memory() == (30 * GiB, "MemAvailable of /proc/meminfo (no memory cgroup limit is set)")
    off = fake_host(tmp_path / "d", monkeypatch)
    assert off.available_host_bytes() is None
    off.check_host_memory(10**15, "anything")  # nothing to compare with: not refused


def test_host_memory_check_counts_every_local_process(tmp_path, monkeypatch):
    """All processes of a host offload at once: each one's share times the local processes is compared with
    what is available (4 x 10 GiB > 32 GiB is refused, 1 x 10 GiB is not)."""
    off = fake_host(tmp_path, monkeypatch, available_kb=8 * 2**20, v2={"": (32 * GiB, 0)})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert off.local_ranks_on_host() == 4
    with pytest.raises(MemoryError, match=r"rollout.offload=kv needs 10.0 GiB of host memory per process, 40.0 "
                                          r"GiB for the 4 processes on this host, but 32.0 GiB are available \(the "
                                          r"memory cgroup limit of 32.0 GiB, 0.0 GiB used .*memory.max\).*"
                                          r"fewer processes on this host"):
        off.check_host_memory(10 * GiB, "rollout.offload=kv")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    off.check_host_memory(10 * GiB, "rollout.offload=kv")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")  # Open MPI's launch
    with pytest.raises(MemoryError, match="4 processes on this host"):
        off.check_host_memory(10 * GiB, "rollout.offload=kv")
    off.check_host_memory(10 * GiB, "rollout.offload=kv", local_ranks=1)


def test_host_buffers_are_reused_between_rollouts():
    """A rollout's own pool keeps its host buffers from document to document (a second rollout has its own)."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(25))
    rollout = ExactRollout(8, offload="all")
    rollout.run(model, ids)
    allocated = rollout.host_pool.allocated
    assert allocated > 0
    rollout.run(model, ids[:, :20])  # shorter: fits the same buffers
    assert rollout.host_pool.allocated == allocated
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)
    other = ExactRollout(8, offload="all")
    other.run(model, ids[:, :20])
    assert other.host_pool.allocated > 0 and rollout.host_pool.allocated == allocated
    model.zero_grad(set_to_none=True)
    chunked_forward_backward(model, ids, chunk_size=8)
    chunked_forward_backward(model, ids[:, :20], chunk_size=8)
    assert total_rel_error(grads_of(model), expected) <= 1e-12  # reused (dirty) buffers change nothing


def test_pool_releases_smaller_buffers_before_growing():
    pool = HostPool()
    a, b = pool.take(100, pinned=False), pool.take(200, pinned=False)
    pool.give([a, b])
    assert pool.take(150, pinned=False) is b and pool.allocated == 2
    pool.give([b])
    big = pool.take(1000, pinned=False)  # nothing fits: the smaller free buffers are released first
    assert big.numel() == 1000 and pool.free_bytes == 0 and pool.allocated == 3


def test_bad_offload_mode_is_named():
    with pytest.raises(ValueError, match="offload='gpu' is not one of"):
        ExactRollout(4, offload="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and copy streams need a CUDA GPU")
@pytest.mark.parametrize("mode,layers", [("kv", 0), ("all", 0), ("kv", 3)])
@pytest.mark.parametrize("attention", ["cudnn", "flash", "sdpa"])
def test_gpu_offload_equals_device_state(mode, layers, attention):
    """On the GPU the copies run on a side stream; a missing wait reads another layer's (or stale) K/V and moves
    the gradients far more than the run-to-run noise of the kernels (FA2's backward accumulates with atomics)."""
    model = tiny_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512,
                       num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=5,
                       max_position_embeddings=8192).cuda().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 4000), generator=torch.Generator().manual_seed(24)).cuda()
    runs = []
    for offload in ("none", "none", mode):
        result = chunked_forward_backward(model, ids, chunk_size=512, attention=attention, offload=offload,
                                          offload_layers=layers if offload != "none" else 0)
        runs.append((result, grads_of(model)))
        model.zero_grad(set_to_none=True)
    noise = total_rel_error(runs[1][1], runs[0][1])
    err = total_rel_error(runs[2][1], runs[0][1])
    assert err <= max(3 * noise, 1e-3), (mode, attention, err, noise)
    assert runs[2][0].loss == pytest.approx(runs[0][0].loss, rel=1e-3)
    # the device holds what the memory model says: the offloaded layers' state gave way to 2 slots per kind
    assert runs[2][0].state_bytes == 4000 * state_bytes_per_token(CausalLMAdapter(model), mode, offload_layers=layers)
    assert runs[2][0].state_bytes < runs[0][0].state_bytes


def test_pipeline_stage_offloads_its_own_layers():
    """rollout.offload under pipeline stages: each stage's state offloads its own layers (offload_layers counts
    the stage's first N); the training runs equal to one process are in tests/distributed."""
    from rollout_dist.config import RolloutConfig
    from rollout_dist.engine import make_rollout
    from rollout_dist.model import trim_to_stage
    from rollout_dist.parallel import RankLayout
    from rollout_dist.parallel.pipeline import PipelineRollout

    model = tiny_model("llama", num_hidden_layers=6)
    trim_to_stage(model, 1, [2, 3, 1])  # stage 1: global layers 2, 3, 4
    rollout = make_rollout(RolloutConfig(chunk_size=4, offload="all", offload_layers=2),
                           RankLayout(pp=3, rank=1, world=3))
    assert isinstance(rollout, PipelineRollout)
    state = rollout.new_state(model, 1, 12)
    assert isinstance(state, OffloadedKVState) and state.pool is rollout.host_pool
    assert (state.layer_offset, state.num_layers, state.offloaded, state.mode) == (2, 3, 2, "all")
    assert state.keys[:2] == [None, None] and state.keys[2] is not None  # global layer 4 stays on the device
    state.close()
    with pytest.raises(ValueError, match="offload='disk' is not one of"):
        PipelineRollout(4, RankLayout(pp=3, rank=1, world=3), offload="disk")
