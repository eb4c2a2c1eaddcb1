"""The adapter hands the carried state to HF decoder layers under the name the installed transformers takes."""
import inspect
import warnings

import pytest
import torch
import transformers

from rollout_dist import chunked_forward_backward
from rollout_dist.model import CausalLMAdapter
from rollout_dist.model.adapter import cache_argument
from tests.helpers import VOCAB, grads_of, reference_loss_and_grads, tiny_model, worst_rel_error


class _Before524(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs):
        return hidden_states


class _From524(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        return hidden_states


def test_the_cache_argument_is_read_from_the_signature():
    assert cache_argument(_Before524) == "past_key_values"
    assert cache_argument(_From524) == "cache"

    class Neither(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states
    with pytest.raises(TypeError, match="takes none of"):
        cache_argument(Neither)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_installed_transformers_gets_its_own_name_and_no_deprecation(family):
    model = tiny_model(family)
    layer_cls = type(model.model.layers[0])
    expected = "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"
    assert CausalLMAdapter(model).cache_argument == expected, transformers.__version__
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(3))
    _, ref = reference_loss_and_grads(model, ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated", category=FutureWarning)
        chunked_forward_backward(model, ids, chunk_size=4)
    worst, name = worst_rel_error(grads_of(model), ref)
    assert worst <= 1e-9, (name, worst)  # the K/V were carried (a name the layer ignored would lose them)
