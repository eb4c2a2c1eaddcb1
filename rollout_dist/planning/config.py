"""Planner profiles: how documents are cut into chunks (``planner=default|legal|medical|finance``).

The Hydra group ``hydra_conf/planner/`` holds one YAML per profile; ``TrainConfig.planner`` and the planning
CLI (``python -m rollout_dist.plan --profile legal``) both build this dataclass from it.  No torch import here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

MIN_OVERLAP_TOKENS = 128
BOUNDARY_WEIGHT_KINDS = ("section", "paragraph", "list_item", "sentence")


def _error(message: str) -> ValueError:
    """``rollout_dist.config.ConfigError`` (imported when needed: that module imports this one)."""
    from rollout_dist.config import ConfigError
    return ConfigError(message)


@dataclass
class PlannerConfig:
    profile: str = "default"
    """Name of the profile (the config group's option); recorded in the chunk index."""
    max_chunk_tokens: int = 2048
    """No chunk holds more tokens. Only a sentence longer than this is cut inside, at token level, and the
    chunk after the cut records ``token_cut`` as its boundary kind."""
    min_chunk_tokens: int = 512
    """Chunks are at least this long where the document allows (its last chunk, a document shorter than this,
    or a stretch without any boundary can be shorter)."""
    memory_overlap_tokens: int = 0
    """Memory mode only: each chunk re-reads at least this many tokens of the previous chunk as context,
    extended back to a sentence start. 0 (no overlap) or >= 128. Exact mode never overlaps (it would count
    those tokens twice), whatever this says."""
    boundary_weights: dict = field(default_factory=lambda: {"section": 1.0, "paragraph": 0.6,
                                                             "list_item": 0.5, "sentence": 0.3})
    """Base score of cutting at each boundary kind; the planner prefers high scores (section > paragraph >
    sentence). A cut right after a heading scores 0, so headings stay with their text."""
    topic_weight: float = 0.4
    """Added to a boundary's score times the topic shift there (TF-IDF cosine distance in [0, 1] between the
    blocks on either side)."""
    fill_weight: float = 0.3
    """Added times (chunk tokens / max_chunk_tokens): among equally good boundaries the fuller chunk wins."""
    max_entities: int = 8
    """Key entities (defined terms, names, numbers) kept per chunk in the index."""

    def __post_init__(self):
        for key in ("max_chunk_tokens", "min_chunk_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _error(f"planner.{key} must be a positive integer, got {value!r}")
        if self.min_chunk_tokens > self.max_chunk_tokens:
            raise _error(f"planner.min_chunk_tokens={self.min_chunk_tokens} exceeds planner."
                                     f"max_chunk_tokens={self.max_chunk_tokens}; lower the minimum")
        if self.memory_overlap_tokens != 0 and not (
                MIN_OVERLAP_TOKENS <= self.memory_overlap_tokens < self.max_chunk_tokens):
            raise _error(
                f"planner.memory_overlap_tokens={self.memory_overlap_tokens}: use 0 (no overlap) or a value from "
                f"{MIN_OVERLAP_TOKENS} up to below planner.max_chunk_tokens={self.max_chunk_tokens}")
        weights = dict(self.boundary_weights)
        if set(weights) != set(BOUNDARY_WEIGHT_KINDS):
            raise _error(f"planner.boundary_weights needs exactly the keys {BOUNDARY_WEIGHT_KINDS}, "
                                     f"got {sorted(weights)}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in weights.values()):
            raise _error(f"planner.boundary_weights must be non-negative numbers, got {weights}")
        for key in ("topic_weight", "fill_weight"):
            if getattr(self, key) < 0:
                raise _error(f"planner.{key} must not be negative, got {getattr(self, key)}")
        if not isinstance(self.max_entities, int) or self.max_entities < 0:
            raise _error(f"planner.max_entities must be a non-negative integer, got {self.max_entities!r}")

    def to_dict(self) -> dict:
        return {"profile": self.profile, "max_chunk_tokens": self.max_chunk_tokens,
                "min_chunk_tokens": self.min_chunk_tokens, "memory_overlap_tokens": self.memory_overlap_tokens,
                "boundary_weights": dict(self.boundary_weights), "topic_weight": self.topic_weight,
                "fill_weight": self.fill_weight, "max_entities": self.max_entities}


def load_profile(path) -> PlannerConfig:
    """A planner YAML (one file of ``hydra_conf/planner/``) -> checked ``PlannerConfig``."""
    merged = OmegaConf.merge(OmegaConf.structured(PlannerConfig), OmegaConf.load(str(path)))
    try:
        return OmegaConf.to_object(merged)
    except Exception as err:  # OmegaConf wraps errors raised inside __post_init__
        cause = err.__cause__ or err.__context__
        from rollout_dist.config import ConfigError
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{path}: {cause}") from None
        raise
