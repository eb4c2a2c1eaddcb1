"""Split chunk attention (prefix + causal diagonal, merged by log-sum-exp) vs a float64 reference. CUDA only."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="fused attention kernels need a CUDA GPU")]


def reference(q, k, v):
    """Lower-right causal attention in float64 with K/V heads repeated for grouped queries."""
    c, e = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=causal_lower_right(c, e)._materialize(q.device))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("c,prefix", [(64, 0), (1, 0), (1, 999), (5, 3), (128, 128), (104, 896), (128, 1000),
                                       (300, 4096)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_split_attention_matches_reference_no_worse_than_sdpa(backend, hq, hkv, c, prefix, layout):
    """``bshd``: (B, H, S, D) views of (B, S, H, D) storage, as HF's projections and the K/V buffers give them."""
    from rollout_dist.model.split_attention import split_chunk_attention
    g = torch.Generator(device="cuda").manual_seed(c + prefix)

    def mk(h, n):
        if layout == "bshd":
            return torch.randn(2, n, h, 64, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        return torch.randn(2, h, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(hq, c), mk(hkv, prefix + c), mk(hkv, prefix + c)
    dout = mk(hq, c)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    errors = {}
    for name in ("sdpa", backend):
        ins = [t.detach().requires_grad_() for t in (q, k, v)]  # keep the layout under test
        if name == "sdpa":
            out = F.scaled_dot_product_attention(*ins, attn_mask=causal_lower_right(c, prefix + c),
                                                 enable_gqa=hq != hkv)
        else:
            out = split_chunk_attention(*ins, None, backend)
        grads = torch.autograd.grad(out, ins, dout)
        errors[name] = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    for mine, base in zip(errors[backend], errors["sdpa"]):
        assert mine <= 1.5 * base + 1e-3, errors
