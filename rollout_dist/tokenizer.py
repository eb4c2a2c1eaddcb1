"""The built-in byte-level tokenizer: one token per UTF-8 byte, plus an end-of-text token.

Built with HF ``tokenizers`` (ByteLevel pre-tokenizer and decoder over a merge-free BPE whose vocabulary is the
256 byte symbols), so it saves and loads like any HF tokenizer (``save_pretrained`` / ``AutoTokenizer``).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
BYTE_VOCAB = 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # order the symbols by the byte they stand for, so token id == byte value
    byte_to_symbol = _bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(BYTE_VOCAB)}
    assert set(vocab) == set(alphabet)
    vocab[EOS] = BYTE_VOCAB
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, model_max_length=1 << 30)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
