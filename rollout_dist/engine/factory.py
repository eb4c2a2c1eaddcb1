"""One place where a rollout is picked from the config: exact on one process, one pipeline stage's part, or
memory mode's (on one process or one pipeline stage)."""
from __future__ import annotations

from typing import Sequence

from .rollout import Rollout

CPU_AUTO_CHUNK = 512
"""``rollout.chunk_size=0`` where there is no GPU memory to size it by (the trainer's memory planner sizes it on
a GPU once the engine exists)."""


def make_rollout(rollout_cfg, layout=None, *, chunk_size: int | None = None, memory=None,
                 tokenizer=None) -> Rollout:
    """The ``Rollout`` for ``rollout_cfg`` (a ``RolloutConfig``): ``ExactRollout`` on one process, with a
    ``RankLayout`` of more than one pipeline stage the ``PipelineRollout`` of this rank's stage (K/V offload
    there applies to the stage's own layers), or for
    ``rollout.mode=memory`` the ``MemoryRollout`` (with stages: this stage's ``PipelineMemoryRollout``;
    ``memory``: the ``MemoryConfig``, for ``ablate``; ``tokenizer``: the run's, which turns
    ``rollout.importance_keywords`` into token ids).  ``chunk_size`` overrides the config's (0 there means "pick
    from memory", decided later)."""
    chunk = chunk_size or rollout_cfg.chunk_size or CPU_AUTO_CHUNK
    if rollout_cfg.mode == "memory":
        return _memory_rollout(rollout_cfg, layout, chunk, memory, tokenizer)
    if rollout_cfg.mode != "exact":
        raise ValueError(f"rollout.mode={rollout_cfg.mode!r} is not one of exact, memory")
    common = dict(attention=rollout_cfg.attention, keep_attention=rollout_cfg.keep_attention,
                  vocab_tile=rollout_cfg.vocab_tile, keep_tokens=rollout_cfg.keep_attention_tokens)
    if layout is not None and layout.pp > 1:
        from ..parallel.pipeline import PipelineRollout  # parallel builds on engine, not the other way round
        # each stage offloads its own layers' state (offload_layers: the stage's first N)
        return PipelineRollout(chunk, layout, offload=rollout_cfg.offload, offload_layers=rollout_cfg.offload_layers,
                               **common)
    from .exact import ExactRollout
    return ExactRollout(chunk, offload=rollout_cfg.offload, offload_layers=rollout_cfg.offload_layers, **common)


def _memory_rollout(rollout_cfg, layout, chunk: int, memory, tokenizer) -> Rollout:
    from .memory import MemoryRollout
    from .weighting import ImportanceWeights

    importance = None
    if rollout_cfg.loss_weighting == "importance":
        keywords = rollout_cfg.importance_keywords
        if keywords and tokenizer is None:
            raise ValueError("rollout.importance_keywords need the run's tokenizer to become token ids")
        importance = ImportanceWeights(keyword=float(rollout_cfg.importance_keyword),
                                       shift=float(rollout_cfg.importance_shift),
                                       loss=float(rollout_cfg.importance_loss),
                                       keywords=keyword_tokens(keywords, tokenizer) if keywords else ())
    common = dict(bptt_chunks=rollout_cfg.bptt_chunks, loss_weighting=rollout_cfg.loss_weighting,
                  ablate=bool(memory.ablate) if memory is not None else False, importance=importance,
                  vocab_tile=rollout_cfg.vocab_tile)
    if layout is not None and layout.pp > 1:
        from ..parallel.memory_pipeline import PipelineMemoryRollout  # parallel builds on engine
        return PipelineMemoryRollout(chunk, layout, **common)
    return MemoryRollout(chunk, **common)


def keyword_tokens(keywords: Sequence[str], tokenizer) -> tuple[tuple[int, ...], ...]:
    """Each keyword as the token ids the run's documents hold it as: tokenized alone and after a space (BPE
    tokenizers spell a word inside a text with its leading space), without special tokens; duplicates once."""
    out: list[tuple[int, ...]] = []
    for word in keywords:
        for text in (word, " " + word):
            ids = tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)
