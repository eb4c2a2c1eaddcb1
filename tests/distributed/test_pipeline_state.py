"""Pipeline stages on CPU (gloo, two processes): a stage's carried state stopped at a fill boundary, saved, loaded
into a fresh state and continued gives the uninterrupted result bit for bit, and with dropout on, pp=2 gives one
process's gradients (the masks are keyed by the global layer index, not by the stage); a fill-only pass through
the stages gives HF's logits."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rollout_dist import Boundary, ExactRollout, StreamKey
from rollout_dist.model import stage_state_dict, trim_to_stage
from rollout_dist.parallel import PipelineRollout, RankLayout
from tests.helpers import VOCAB, tiny_model

KEY = StreamKey(seed=2, step=4, document=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _stage(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_model("llama", num_hidden_layers=4, attention_dropout=0.25)
        model.train()
        ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(61))
        with torch.no_grad():
            hf_logits = model.eval()(ids).logits  # the fill-only pass's reference (no dropout)
        model.train()
        one = ExactRollout(4).run(model, ids, stream=KEY)  # one process, the whole model: the reference
        reference = _grads(model)
        model.zero_grad(set_to_none=True)
        layout = RankLayout(pp=2, rank=rank, world=2).build_groups()
        trim_to_stage(model, layout.stage, [2, 2])
        names = set(stage_state_dict(model))

        whole = PipelineRollout(4, layout).run(model, ids, stream=KEY)
        uninterrupted = _grads(model)
        model.zero_grad(set_to_none=True)

        first = PipelineRollout(4, layout)
        state = first.new_state(model, 2, 23)
        partial = first.run(model, ids, state=state, stream=KEY, stop_at=Boundary("fill", 3))
        saved = state.state_dict()
        second = PipelineRollout(4, layout)
        fresh = second.new_state(model, 2, 23)
        fresh.load_state_dict(saved)
        continued = second.run(model, ids, state=fresh)
        resumed = _grads(model)

        model.eval()  # a fill-only pass over a kept state, in two calls, hidden states streaming between stages
        session = second.new_state(model, 2, 23)
        second.fill(model, ids[:, :10], session)
        logits = second.fill(model, ids[:, 10:], session)
        fill_error = None if logits is None else (logits - hf_logits[:, 23 - logits.shape[1]:]).abs().max().item()
        results[rank] = {
            "stage_layers": saved["layers"].tolist(), "partial_complete": partial.complete,
            "bitwise": all(torch.equal(resumed[n], g) for n, g in uninterrupted.items()),
            "loss_equal": continued.loss_sum == whole.loss_sum, "fill_error": fill_error,
            "fill_position": session.boundary.position,
            "loss_vs_one": (whole.loss_sum, one.loss_sum),
            "vs_one_process": max(((uninterrupted[n] - reference[n]).norm() / reference[n].norm()).item()
                                  for n in uninterrupted if n in names or n.removeprefix("model.") in names)}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pipeline_state_continues_bit_for_bit_and_dropout_matches_one_process():
    results = mp.Manager().dict()
    mp.spawn(_stage, args=(_free_port(), results), nprocs=2, join=True)
    assert results[0]["stage_layers"] == [0, 1] and results[1]["stage_layers"] == [2, 3]
    for rank in (0, 1):
        r = results[rank]
        assert not r["partial_complete"] and r["bitwise"], (rank, r)
        assert r["vs_one_process"] <= 1e-10, (rank, r)
    assert results[1]["loss_equal"]
    assert results[0]["fill_error"] is None and results[1]["fill_error"] <= 1e-12  # logits on the last stage
    assert results[0]["fill_position"] == results[1]["fill_position"] == 23
    ours, one = results[1]["loss_vs_one"]
    assert abs(ours - one) <= 1e-12 * one
