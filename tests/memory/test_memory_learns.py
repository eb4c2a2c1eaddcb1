"""The memory is used: a key seen in one chunk is recalled in the next, which no chunk-local model can do.

Two 32-token chunks of random tokens: the first holds a marker and the key (one of 10 tokens), the second ends
with the marker, after which the key must come.  A tiny model trained briefly recalls the key through its memory;
with the state ablated it cannot beat chance (10%).  The memory's initial write scores matter: with them near
zero (each slot starts as the chunk's mean) the same training stays near chance (memory.write_sharpness)."""
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_dist import MemoryConfig, with_memory

VOCAB, KEYS, MARKER, CHUNK = 64, 10, 63, 32


def _batch(n, g):
    ids = torch.randint(KEYS, MARKER, (n, 2 * CHUNK), generator=g)
    pos = torch.randint(0, CHUNK - 2, (n,), generator=g)
    key = torch.randint(0, KEYS, (n,), generator=g)
    rows = torch.arange(n)
    ids[rows, pos], ids[rows, pos + 1] = MARKER, key
    ids[:, -2], ids[:, -1] = MARKER, key
    return ids, key


def _train(sharpness: float, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         attn_implementation="sdpa", use_cache=False)
    model = with_memory(LlamaForCausalLM(config), MemoryConfig(slots=4, write_dim=32, write_sharpness=sharpness))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids, key = _batch(64, g)
        loss = F.cross_entropy(model(ids, chunk_size=CHUNK).logits[:, -2], key)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ids, key = _batch(512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        used = (model(ids, chunk_size=CHUNK).logits[:, -2].argmax(-1) == key).float().mean().item()
        ablated = (model(ids, chunk_size=CHUNK, ablate_state=True).logits[:, -2].argmax(-1) == key).float().mean()
    return used, ablated.item()


def test_a_key_is_recalled_one_chunk_later_through_the_memory_only():
    used, ablated = _train(sharpness=3.0)
    assert used >= 0.9, used
    assert ablated <= 0.2, ablated  # chance is 0.1


def test_near_uniform_initial_writes_do_not_learn_in_the_same_budget():
    used, _ = _train(sharpness=0.05)
    assert used <= 0.5, used
