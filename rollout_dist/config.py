"""Run configuration: one dataclass per section, checked in ``__post_init__``, registered in Hydra's ConfigStore.

Hydra composes ``hydra_conf/config.yaml`` (groups: model, data, rollout, trainer, checkpoint) onto the schema
``base_config`` registered here; ``to_train_config`` turns the composed tree into these dataclasses, which runs
the checks, a key the schema lacks included (Hydra's ``+key=value`` adds any).  rollout_dist/cli.py turns
Hydra's own errors about the command line into the same one line.  This module does not import torch.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rollout_dist.planning.config import PlannerConfig

DTYPES = ("auto", "float32", "bfloat16", "float64")
ATTENTION_KERNELS = ("auto", "sdpa", "cudnn", "flash", "math")  # rollout_dist.model.attention.KERNELS
SCHEDULES = ("constant", "cosine", "linear")
OFFLOAD_MODES = ("none", "kv", "all")  # rollout_dist.model.offload.OFFLOAD_MODES


class ConfigError(ValueError):
    """A configuration value a user must change; the message names the key, the value and what to do."""


def _positive(key: str, value, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}{'; ' + hint if hint else ''}")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Which shape this is (the config group's option); informational."""
    path: Optional[str] = None
    """Local HF model directory (config.json, weights, tokenizer). None: build ``family`` from the fields below
    with random weights and the built-in byte-level tokenizer."""
    family: str = "llama"
    """HF architecture built when ``path`` is None: llama, mistral or qwen2."""
    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1 << 20
    """Only bounds the positions RoPE is evaluated at; nothing is allocated for it."""
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    dtype: str = "auto"
    """float32, bfloat16, float64, or auto: bfloat16 on a GPU, float32 on CPU."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not one of {DTYPES}")
        if self.family not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"model.family={self.family!r}: choose llama, mistral or qwen2")
        if self.path is None:
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                        "num_kv_heads", "max_position_embeddings"):
                _positive(f"model.{key}", getattr(self, key))
            if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
                raise ConfigError(f"model.hidden_size={self.hidden_size} must divide by model.num_heads="
                                  f"{self.num_heads}, which must divide by model.num_kv_heads={self.num_kv_heads}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"model.attention_dropout must lie in [0, 1), got {self.attention_dropout}")


@dataclass
class DataConfig:
    path: Optional[str] = None
    """A .txt file (one document), a .jsonl file (one document per line, in ``text_field``), a directory of
    those, or a glob. None: the sample corpus bundled with the package (rollout_dist/assets/corpus)."""
    text_field: str = "text"
    """Field of each JSONL record that holds the document text."""
    max_doc_tokens: Optional[int] = None
    """Split longer documents into consecutive pieces of at most this many tokens. None: no limit, except
    4096 for the bundled sample so that the CPU demo stays quick."""
    shuffle: bool = True
    """Reshuffle document order every epoch (deterministic for ``trainer.seed``)."""
    invalid_utf8: str = "replace"
    """What to do with bytes that are not UTF-8: replace (with U+FFFD, counted and reported) or error."""
    balance: bool = True
    """With several data-parallel replicas: deal documents so every replica gets similar tokens and attention
    cost (sum of T^2) per step (rollout_dist.planning.sharding). false: a seeded shuffle dealt round-robin."""
    chunk_index: Optional[str] = None
    """A chunk index written by ``python -m rollout_dist.plan`` for these documents: chunks end at the planned
    (section, paragraph, sentence) boundaries instead of every ``rollout.chunk_size`` tokens."""

    def __post_init__(self):
        if self.max_doc_tokens is not None:
            _positive("data.max_doc_tokens", self.max_doc_tokens, "or null for no limit")
            if self.max_doc_tokens < 2:
                raise ConfigError("data.max_doc_tokens must be at least 2 (a document needs a next-token target)")
        if self.invalid_utf8 not in ("replace", "error"):
            raise ConfigError(f"data.invalid_utf8={self.invalid_utf8!r}: choose replace or error")
        if self.chunk_index is not None and self.max_doc_tokens is not None:
            raise ConfigError("data.chunk_index plans whole documents; it cannot be combined with "
                              "data.max_doc_tokens (set it to null)")


@dataclass
class RolloutConfig:
    mode: str = "exact"
    """exact: chunks attend to all earlier K/V and gradients equal full-sequence training. memory: each chunk
    attends to itself and reads a bounded per-layer state carried from the previous chunks (memory.*,
    docs/memory_mode.md): memory and cost per chunk stay constant however long the document."""
    bptt_chunks: int = 0
    """Memory mode: backpropagate through the carried state at most this many chunks back (truncated BPTT: the
    state's gradient is cut every k chunks). 0: through every chunk of the document."""
    loss_weighting: str = "tokens"
    """Memory mode: how chunks weigh in a document's loss: tokens (the plain token mean), chunks (each chunk's
    mean counts equally) or importance (rollout.importance_*; formulas in docs/memory_mode.md). Logged per chunk."""
    importance_keywords: list = field(default_factory=list)
    """loss_weighting=importance: task keywords (strings, tokenized with the model's tokenizer); a chunk holding
    one scores rollout.importance_keyword more."""
    importance_keyword: float = 1.0
    """loss_weighting=importance: score added to a chunk holding a keyword."""
    importance_shift: float = 1.0
    """loss_weighting=importance: times the topic shift at the chunk's start (planner boundary score, or the
    memory's cosine distance to the previous chunk)."""
    importance_loss: float = 1.0
    """loss_weighting=importance: times how far the chunk's forward-pass loss exceeds the document's mean."""
    chunk_size: int = 512
    """Tokens per chunk. Activation memory scales with it; the K/V of the whole document are kept. 0: picked at
    start-up as the largest of 128 ... 32768 whose predicted peak for the longest document stays within 90% of
    the GPU's memory (rollout_dist/engine/budget.py; larger chunks run faster); 512 on CPU."""
    attention: str = "auto"
    """Chunk-attention kernel: auto (cuDNN fused attention on CUDA in bf16/fp16, PyTorch SDPA elsewhere), sdpa,
    cudnn, flash (FA2) or math (plain torch, a reference). Dropout and sliding windows always use sdpa."""
    keep_attention: bool = False
    """Keep every layer's attention output of the fill pass (2 x hidden bytes per token per layer, plus the
    log-sum-exp) so the backward pass does not compute attention forward again: faster, more memory. Applies
    with the split kernels (auto/cudnn/flash/math)."""
    keep_attention_tokens: int = 0
    """With keep_attention: keep the outputs only of the chunks that start within the last N tokens of a
    document. The last chunks have the longest prefixes, so their attention forward costs most: keeping a
    quarter of a document's tokens saves almost half of the recomputed attention, for documents too long to
    keep them all. 0: every chunk's, or on a GPU, if the memory model (engine/budget.py) says they do not all
    fit beside the rest within 90% of its memory, those of as many last chunks as fit (logged at start-up)."""
    offload: str = "none"
    """Where the carried state lives: none (GPU), kv (K/V in pinned host memory, staged into the GPU a layer at
    a time on a side stream; dK/dV stay on the GPU) or all (K/V and dK/dV on the host). GPU memory then no longer
    grows with the document for what is offloaded; host memory does (docs/performance.md)."""
    offload_layers: int = 0
    """With offload kv or all: offload the state of only the first N decoder layers; the later layers' stays on
    the GPU. Moves one layer's state (4 x kv_heads x head_dim bytes per token, K/V and dK/dV) at a time between
    host and GPU memory, for machines where neither holds all of it. 0: every layer. With pipeline stages
    (parallel.pp > 1): the first N layers of each stage (each stage offloads its own layers' state)."""
    vocab_tile: int = 0
    """Compute the LM head and loss in tiles of this many vocabulary rows, so a chunk's (tokens x vocab) logits
    never exist whole (e.g. 16384 for 128K-token vocabularies and long chunks). 0: the plain head."""

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 0:
            raise ConfigError(f"rollout.chunk_size must be a positive number of tokens per chunk (e.g. 4096) or 0 "
                              f"to pick it from GPU memory; got {self.chunk_size!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"rollout.attention={self.attention!r} is not one of {ATTENTION_KERNELS}")
        if not isinstance(self.keep_attention_tokens, int) or self.keep_attention_tokens < 0:
            raise ConfigError(f"rollout.keep_attention_tokens={self.keep_attention_tokens!r} must be 0 (every chunk, "
                              "or as many as fit) or a positive number of tokens at the end of each document")
        if not isinstance(self.vocab_tile, int) or self.vocab_tile < 0:
            raise ConfigError(f"rollout.vocab_tile={self.vocab_tile!r} must be 0 (off) or a positive number of rows")
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"rollout.offload={self.offload!r} is not one of {OFFLOAD_MODES}")
        if not isinstance(self.offload_layers, int) or self.offload_layers < 0:
            raise ConfigError(f"rollout.offload_layers={self.offload_layers!r} must be 0 (every layer) or a positive "
                              "number of layers")
        if self.offload_layers and self.offload == "none":
            raise ConfigError(f"rollout.offload_layers={self.offload_layers} has nothing to offload with "
                              "rollout.offload=none: set rollout.offload=kv (or all), or drop offload_layers")
        if self.mode not in ROLLOUT_MODES:
            raise ConfigError(f"rollout.mode={self.mode!r} is not one of {ROLLOUT_MODES}")
        if not isinstance(self.bptt_chunks, int) or isinstance(self.bptt_chunks, bool) or self.bptt_chunks < 0:
            raise ConfigError(f"rollout.bptt_chunks={self.bptt_chunks!r} must be 0 (through every chunk) or a "
                              "positive number of chunks")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"rollout.loss_weighting={self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        if self.mode == "exact" and (self.bptt_chunks or self.loss_weighting != "tokens"):
            raise ConfigError(f"rollout.bptt_chunks={self.bptt_chunks} and rollout.loss_weighting="
                              f"{self.loss_weighting} apply to rollout.mode=memory; exact mode trains the plain "
                              "token mean through every chunk (set rollout.mode=memory, or drop them)")
        for key in ("importance_keyword", "importance_shift", "importance_loss"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ConfigError(f"rollout.{key}={getattr(self, key)!r} must be a number >= 0")
        self.importance_keywords = [str(k) for k in self.importance_keywords]


STATE_DTYPES = ("auto", "float32", "model")
ROLLOUT_MODES = ("exact", "memory")
LOSS_WEIGHTINGS = ("tokens", "chunks", "importance")  # rollout_dist.engine.weighting.WEIGHTINGS


@dataclass
class MemoryConfig:
    """Memory mode (``rollout.mode=memory``, docs/memory_mode.md): a bounded state of ``slots`` vectors per decoder
    layer carried from chunk to chunk.  Also the argument of ``rollout_dist.with_memory``; every field has a
    default, so ``MemoryConfig()`` works."""

    slots: int = 16
    """m: state vectors per layer.  The state is layers x m x hidden_size values per document row, whatever the
    document's length."""
    write_dim: int = 128
    """Width of the keys by which each slot picks what to take from the previous chunk's hidden states."""
    write_sharpness: float = 3.0
    """Standard deviation of the slots' write scores at initialisation: how few of a chunk's tokens each slot
    starts by taking in. Near 0 every slot starts as the chunk's mean, which dilutes a salient token by the chunk
    length and kept the memory from learning in the evaluation (docs/memory_mode.md)."""
    chunk_buckets: int = 32
    """Log-spaced buckets of the learned chunk-index embedding: bucket 0 is chunk 0, bucket b chunks
    [2^(b-1), 2^b); chunks past the last bucket share it, so any document length works."""
    topic_damping: float = 1.0
    """Initial strength of the topic-shift damping (learned per layer): the injected memory is scaled by
    exp(-strength x cosine distance between this chunk's topic vector and the previous chunk's)."""
    state_dtype: str = "auto"
    """dtype of the carried state: float32, model (the model's dtype), or auto (float32 for bf16/fp16 models, the
    model's dtype otherwise)."""
    ablate: bool = False
    """Zero the carried state at every chunk (the memory reads nothing): the ablation of the evaluation."""
    lr: float = 1e-3
    """Learning rate of the memory's parameters (gates, decays, projections, chunk-index embedding), their own
    optimizer group; the schedule scales it like the model's. 0: the model's trainer.lr."""
    weight_decay: float = 0.0
    """Weight decay of the memory's parameters (Infini-attention's reproduction needed 0 for its gates)."""
    curriculum: list = field(default_factory=list)
    """Segment-count curriculum (RMT/ARMT): e.g. [2, 4, 8, 16]: documents are cut to that many chunks, the
    next count after every ``curriculum_steps`` optimizer steps; the last count holds until the end. []: off."""
    curriculum_steps: int = 100
    """Optimizer steps per curriculum stage."""

    def __post_init__(self):
        for key in ("slots", "write_dim", "chunk_buckets", "curriculum_steps"):
            _positive(f"memory.{key}", getattr(self, key))
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"memory.state_dtype={self.state_dtype!r} is not one of {STATE_DTYPES}")
        if not isinstance(self.write_sharpness, (int, float)) or self.write_sharpness <= 0:
            raise ConfigError(f"memory.write_sharpness={self.write_sharpness!r} must be a number > 0")
        if not isinstance(self.topic_damping, (int, float)) or self.topic_damping < 0:
            raise ConfigError(f"memory.topic_damping={self.topic_damping!r} must be a number >= 0 (0: no damping)")
        for key in ("lr", "weight_decay"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ConfigError(f"memory.{key}={getattr(self, key)!r} must be a number >= 0")
        curriculum = list(self.curriculum)
        if any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in curriculum):
            raise ConfigError(f"memory.curriculum={curriculum!r} must list positive segment counts, e.g. [2,4,8]")
        self.curriculum = curriculum


@dataclass
class TrainerConfig:
    max_steps: int = 40
    """Optimizer steps to run."""
    seed: int = 0
    grad_accum: int = 1
    """Documents per optimizer step (per data-parallel rank). The loss is normalised by the target tokens of
    the whole window, so k accumulated documents give the update of one batch of those k documents."""
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int = 5
    schedule: str = "cosine"
    """constant (after warm-up), cosine or linear decay to ``min_lr`` at ``max_steps``."""
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2."""
    offload_optimizer: str = "none"
    """ZeRO-Offload: ``cpu`` keeps the fp32 master weights, gradients and Adam moments in pinned host memory and
    runs the Adam step there (DeepSpeed's CPU Adam on GPU runs); the GPU keeps the bf16 weights only. Needs
    trainer.zero_stage 1 or 2."""
    optimizer_dtype: str = "fp32"
    """The optimizer's copy of the model: ``fp32`` master weights, gradients and Adam moments (16 bytes per
    parameter with ZeRO-Offload), or ``bf16`` for all three (8 bytes; DeepSpeed's bf16_master_weights_and_grads
    and bf16_optimizer_states). bf16 halves the host memory ZeRO-Offload needs (an 8B model fits a 128 GiB host)
    but an update smaller than a weight's bf16 resolution (1/256 of it) is lost, and chunk gradients add up in
    bf16. Needs a bf16 model and trainer.zero_stage 1 or 2."""
    device: str = "auto"
    """auto (CUDA when available), cuda or cpu."""
    log_every: int = 1
    tensorboard: bool = True

    def __post_init__(self):
        _positive("trainer.max_steps", self.max_steps)
        _positive("trainer.grad_accum", self.grad_accum)
        _positive("trainer.log_every", self.log_every)
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"trainer.zero_stage={self.zero_stage}: chunked rollout supports ZeRO 0, 1 or 2")
        if self.offload_optimizer not in ("none", "cpu"):
            raise ConfigError(f"trainer.offload_optimizer={self.offload_optimizer!r}: choose none or cpu")
        if self.optimizer_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"trainer.optimizer_dtype={self.optimizer_dtype!r}: choose fp32 or bf16")
        if self.optimizer_dtype == "bf16" and self.zero_stage == 0:
            raise ConfigError("trainer.optimizer_dtype=bf16 needs trainer.zero_stage=1 or 2 (DeepSpeed keeps bf16 "
                              "master weights only in ZeRO's partitioned optimizer)")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError("trainer.offload_optimizer=cpu needs trainer.zero_stage=1 or 2 (DeepSpeed offloads "
                              "the optimizer states that ZeRO partitions)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"trainer.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"trainer.device={self.device!r}: choose auto, cuda or cpu")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= trainer.min_lr <= trainer.lr and lr > 0; got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("trainer.warmup_steps and trainer.grad_clip must not be negative")
        if len(self.betas) != 2:
            raise ConfigError(f"trainer.betas needs two values, got {self.betas}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    """Run directory: logs, TensorBoard events, the resolved config, the snapshot store (``state.zarr``) and the
    final HF model (``final/``). Without ``resume`` it must be new or empty: nothing of an earlier run, or
    anything else, is overwritten."""
    store: Optional[str] = None
    """Where snapshots go: a Zarr v3 store at a local or shared POSIX path, or any fsspec URL (s3://, gs://,
    memory://, ...; its fsspec backend installed). None: ``<dir>/state.zarr``. Format: docs/checkpoints.md."""
    save_final: bool = True
    every: int = 0
    """Snapshot the training state (weights, optimizer, LR schedule, step, every rank's data position and random
    state) every this many steps and at the end; 0: none."""
    keep: int = 2
    """Newest valid snapshots kept; older ones are deleted once a newer one is committed."""
    keep_every: int = 0
    """Also keep every snapshot whose step is a multiple of this (0: none)."""
    chunk_every: int = 0
    """Inside a long document, also snapshot the carried K/V after every this many chunks of the fill pass
    (appending only the new chunks), so a run killed inside the document resumes there. 0: off. Exact mode, one
    pipeline stage; useful with ``every=1`` (a chunk snapshot continues from the step's starting snapshot)."""
    background: bool = True
    """Persist snapshots on a background thread (training waits only for the copy to host memory)."""
    commit_timeout_s: float = 600.0
    """How long rank 0 waits for the other ranks' parts of a snapshot before giving up on that version."""
    resume: Any = False
    """Continue the run in ``dir``: ``latest`` (or true) for the newest valid snapshot, or a version (``v000042``
    or 42). Damaged versions are named and skipped; with none valid the run starts from scratch and says so."""

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be 0 (off) or a number of steps, got {self.every}")
        if self.chunk_every < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.chunk_every and checkpoint.keep_every must be 0 (off) or positive")
        _positive("checkpoint.keep", self.keep)
        if self.commit_timeout_s <= 0:
            raise ConfigError(f"checkpoint.commit_timeout_s must be positive, got {self.commit_timeout_s}")
        self.resume_version  # checks the value

    @property
    def resuming(self) -> bool:
        return self.resume not in (False, None, "false", "False", "")

    @property
    def resume_version(self) -> int | None:
        """The step of the version ``resume`` names; None for latest (or no resume)."""
        if not self.resuming or self.resume is True or str(self.resume).lower() in ("true", "latest"):
            return None
        text = str(self.resume).strip()
        match = re.fullmatch(r"v?(\d+)", text)
        if not match or isinstance(self.resume, float):
            raise ConfigError(f"checkpoint.resume={self.resume!r}: use false, latest (or true), or a version such "
                              "as v000042")
        return int(match.group(1))


@dataclass
class ParallelConfig:
    pp: int = 1
    """Pipeline stages: the decoder layers (and each layer's carried K/V) are split over this many processes,
    which stream the chunks of a document through the stages."""
    dp: Optional[int] = None
    """Data-parallel replicas (documents are spread over them). None: world size / pp."""
    stage_layers: Optional[list] = None
    """Decoder layers per stage, e.g. [12, 10]. None: balanced by per-token training FLOPs (layer parameters
    plus causal attention at the longest document's length; the LM head counts on the last stage)."""

    def __post_init__(self):
        _positive("parallel.pp", self.pp)
        if self.dp is not None:
            _positive("parallel.dp", self.dp, "or null for world size / pp")
        if self.stage_layers is not None and len(self.stage_layers) != self.pp:
            raise ConfigError(f"parallel.stage_layers={list(self.stage_layers)} needs one entry per stage "
                              f"(parallel.pp={self.pp})")


MISMATCH_POLICIES = ("halt", "warn", "resync")
COORDINATOR_TRANSPORTS = ("auto", "tcp", "mpi")
FAULT_KINDS = ("none", "param_bitflip", "optimizer_bitflip", "state_bitflip", "p2p_corrupt", "coordinator_kill",
               "coordinator_stall")


@dataclass
class CoordinatorConfig:
    """Digests of every rank's state each chunk and step, ordered by a coordinator thread on rank 0, and the checks
    they allow (docs/coordinator.md)."""

    enabled: bool = True
    """Check every step: parameters across data-parallel replicas, parameters and optimizer state at rest between
    steps, each chunk's K/V against the backward pass's recompute, what pipeline stages send against what the
    next receives."""
    topk: int = 8
    """Entries of largest magnitude kept in each digest (a chunk's K/V update, a parameter's update); 0: none (and
    no copy of the parameters before each step)."""
    on_mismatch: str = "halt"
    """halt: stop cleanly (exit 3), publishing no snapshot newer than the last agreed step; warn: log and carry
    on; resync: every rank rolls back to the newest snapshot of an agreed step and continues (logged)."""
    timeout_s: float = 300.0
    """How long a rank waits for the coordinator's verdict on the previous step (and for room in its send queue)
    before treating the coordinator as lost: then halt stops, warn and resync carry on unchecked."""
    transport: str = "auto"
    """auto: mpi4py under mpirun, else a TCP side channel to rank 0; or tcp, mpi."""
    port: int = 0
    """TCP port rank 0 listens on (0: any free port, told to the other ranks through the process group)."""
    queue_frames: int = 256
    """Frames of digests a rank may have queued for sending before ``submit`` waits (bounded memory)."""

    def __post_init__(self):
        if self.on_mismatch not in MISMATCH_POLICIES:
            raise ConfigError(f"coordinator.on_mismatch={self.on_mismatch!r} is not one of {MISMATCH_POLICIES}")
        if self.transport not in COORDINATOR_TRANSPORTS:
            raise ConfigError(f"coordinator.transport={self.transport!r} is not one of {COORDINATOR_TRANSPORTS}")
        if not isinstance(self.topk, int) or not 0 <= self.topk <= 65535:
            raise ConfigError(f"coordinator.topk must be an integer in [0, 65535], got {self.topk!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"coordinator.timeout_s must be positive, got {self.timeout_s}")
        _positive("coordinator.queue_frames", self.queue_frames)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"coordinator.port must be 0 (any free port) or a TCP port, got {self.port!r}")


@dataclass
class FaultConfig:
    """Fault injection for tests of the coordinator's checks (rollout_dist/train/faults.py); off by default."""

    kind: str = "none"
    """none, param_bitflip, optimizer_bitflip, state_bitflip, p2p_corrupt, coordinator_kill, coordinator_stall."""
    rank: int = 0
    """Global rank the fault happens on."""
    step: int = 1
    """Step (1-based, as logs count) the fault happens in."""
    chunk: int = 0
    """state_bitflip, p2p_corrupt: the chunk."""
    layer: int = 0
    """state_bitflip: the (global) decoder layer."""
    tensor: Optional[str] = None
    """param/optimizer_bitflip: the first tensor whose name contains this (default: a decoder-layer weight; the
    optimizer's exp_avg)."""
    bit: int = 0
    """Bit of the element's word that flips (0: the least significant)."""
    index: int = 0
    """Flat index of the element."""
    persistent: bool = False
    """state_bitflip: wrong from the backward recompute on, every time (else: the stored copy flips once)."""

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"fault.kind={self.kind!r} is not one of {FAULT_KINDS}")
        _positive("fault.step", self.step)
        if self.kind == "optimizer_bitflip" and self.step < 2:
            raise ConfigError("fault.kind=optimizer_bitflip needs fault.step >= 2: the optimizer state exists once "
                              "the first step has run")
        for key in ("rank", "chunk", "layer", "bit", "index"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"fault.{key} must be a non-negative integer, got {getattr(self, key)!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self):
        if self.fault.kind != "none" and not self.coordinator.enabled:
            raise ConfigError(f"fault.kind={self.fault.kind} tests the coordinator's checks: set "
                              "coordinator.enabled=true")
        if self.checkpoint.chunk_every and (self.parallel.pp > 1 or self.rollout.mode != "exact"):
            raise ConfigError(f"checkpoint.chunk_every={self.checkpoint.chunk_every} needs rollout.mode=exact on one "
                              f"pipeline stage (this run: rollout.mode={self.rollout.mode}, parallel.pp="
                              f"{self.parallel.pp}): set checkpoint.chunk_every=0")
        if self.rollout.mode == "memory":
            self._check_memory_mode()
        else:
            used = [key for key, on in (("memory.curriculum", self.memory.curriculum),
                                        ("memory.ablate", self.memory.ablate)) if on]
            if used:
                raise ConfigError(f"{' and '.join(used)} apply to rollout.mode=memory; this run has rollout.mode="
                                  f"{self.rollout.mode} (set rollout.mode=memory, or drop them)")

    def _check_memory_mode(self) -> None:
        """What memory mode (``rollout.mode=memory``) does not run, refused with the key to change."""
        ro = self.rollout
        if ro.chunk_size == 0 and self.data.chunk_index is None:
            raise ConfigError("rollout.chunk_size=0 sizes chunks from GPU memory, but in rollout.mode=memory the chunk "
                              "size is part of the model (one memory update per chunk) and memory does not grow "
                              "with the document: set rollout.chunk_size (e.g. 512), or plan chunks with "
                              "data.chunk_index")
        if ro.offload != "none":
            raise ConfigError(f"rollout.offload={ro.offload} offloads the K/V of exact mode; rollout.mode=memory "
                              "carries a small fixed-size state instead: set rollout.offload=none")
        if ro.keep_attention:
            raise ConfigError("rollout.keep_attention applies to rollout.mode=exact's split attention; memory mode "
                              "recomputes one chunk at a time: set rollout.keep_attention=false")
        if ro.attention not in ("auto", "sdpa"):
            raise ConfigError(f"rollout.attention={ro.attention}: rollout.mode=memory runs PyTorch SDPA (chunk-local "
                              "attention plus the memory read): set rollout.attention=auto or sdpa")
        if self.fault.kind in ("state_bitflip", "p2p_corrupt"):
            raise ConfigError(f"fault.kind={self.fault.kind} tests the chunk K/V (or pipeline) checks, which "
                              "rollout.mode=memory does not have (it carries no K/V, and skips the chunk checks): use "
                              "param_bitflip, optimizer_bitflip or a coordinator fault")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)


OPTIONAL_GROUPS = ("experiment",)
"""Config groups of hydra_conf/ outside the defaults list: chosen with ``+group=option``."""

KEYS_DOC = "every key is documented in rollout_dist/config.py"


def _schema_at(path: list[str]):
    """The dataclass at a path of section names (``[]``: TrainConfig); None where the path leaves the schema."""
    schema = TrainConfig
    for part in path:
        hint = get_type_hints(schema).get(part)
        if not is_dataclass(hint):
            return None
        schema = hint
    return schema


def unknown_key(full_key: str) -> tuple[int, list[str]] | None:
    """Where a dotted key leaves the schema: the index of its first part that the schema lacks, with the valid
    keys at that place (top level: the sections and the optional groups); None if the key is valid (or lies
    inside a free-form field)."""
    parts = full_key.split(".")
    if parts[0] == "hydra":
        return None  # Hydra's own node: Hydra checks it
    for i, part in enumerate(parts):
        schema = _schema_at(parts[:i])
        if schema is None:
            return None
        names = [f.name for f in fields(schema)] + (list(OPTIONAL_GROUPS) if i == 0 else [])
        if part not in names:
            return i, names
    return None


def unknown_key_message(full_key: str, value: object = None) -> str:
    """One line for a key the schema lacks: the setting as given, the unknown part, the nearest valid key (by
    ``difflib``), else the valid keys there.  ``full_key`` must hold an unknown part (see ``unknown_key``)."""
    found = unknown_key(full_key)
    if found is None:
        raise ValueError(f"{full_key} is a valid key")
    i, names = found
    parts = full_key.split(".")
    part = parts[i]
    where = ".".join(parts[:i]) or "the config"
    setting = full_key if value is None else f"{full_key}={value}"
    close = difflib.get_close_matches(part, names, n=1)
    if not close:
        return f"{setting}: unknown key {part!r} in {where}, whose keys are {', '.join(names)}; {KEYS_DOC}"
    fixed = ".".join(parts[:i] + close + parts[i + 1:])
    if fixed in OPTIONAL_GROUPS:
        fixed = "+" + fixed
    return (f"{setting}: unknown key {part!r} in {where}; did you mean "
            f"{fixed if value is None else f'{fixed}={value}'}? ({KEYS_DOC})")


def check_keys(cfg: DictConfig) -> None:
    """Refuses a key of the composed tree that the schema lacks: one added on the command line with ``+`` (Hydra
    adds any), or misspelt in a YAML file of hydra_conf/.  Hydra's own node (``hydra``) is not checked."""
    def walk(node: dict, path: list[str]) -> None:
        schema = _schema_at(path)
        if schema is None:
            return  # a free-form field (e.g. planner.boundary_weights)
        names = {f.name for f in fields(schema)}
        for key, value in node.items():
            if not path and key == "hydra":
                continue
            full = path + [str(key)]
            if key not in names:
                while isinstance(value, dict) and value:  # name the first setting below an unknown section
                    key, value = next(iter(value.items()))
                    full.append(str(key))
                raise ConfigError(unknown_key_message(".".join(full), override_text(value)))
            if isinstance(value, dict):
                walk(value, full)

    walk(OmegaConf.to_container(cfg, resolve=False), [])


def override_text(value: object) -> str:
    """A value as one writes it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def value_kind(full_key: str) -> str | None:
    """What a leaf of the schema takes, in words ("an integer", ...); None if it is not a leaf of the schema."""
    parts = full_key.split(".")
    schema = _schema_at(parts[:-1])
    hint = get_type_hints(schema).get(parts[-1]) if schema is not None else None
    if hint is None:
        return None
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list, e.g. [1, 2]",
             dict: "a mapping, e.g. {a: 1}"}
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and args[0] in kinds:  # Optional[X]
        return f"{kinds[args[0]]} or null"
    return kinds.get(hint)


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without the lines it appends (full_key, reference_type, object_type)."""
    return str(err.msg or err).strip().splitlines()[0].strip()


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Composed Hydra tree -> checked dataclasses (``__post_init__`` of every section runs here).  A key the
    schema lacks, a missing value or an interpolation that does not resolve is a ``ConfigError`` as well."""
    check_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps errors raised inside __post_init__
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(err, OmegaConfBaseException):
            where = f"{err.full_key}: " if err.full_key else ""
            raise ConfigError(f"{where}{omegaconf_message(err)}; {KEYS_DOC}") from None
        raise
    if not isinstance(obj, TrainConfig):
        raise ConfigError("the composed config is not a TrainConfig; does hydra_conf/config.yaml list base_config?")
    return obj


register_configs()
