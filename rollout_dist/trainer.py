"""Builds model, data and a DeepSpeed engine from a ``TrainConfig`` and owns the training loop.

Every input is checked before anything is written: the run directory is created only once the model and the
documents have loaded, and it must not already hold a run.  One optimizer step = ``trainer.grad_accum``
documents per rank, each run through the exact chunk rollout; the loss of the step is normalised by the target
tokens of the whole window (of all replicas), so accumulating k documents equals one batch of those k documents.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError, TrainConfig
from .data import Document, DocumentOrder, load_documents
from .ds_config import deepspeed_config
from .engine import ExactRollout
from .engine.memory import (activation_bytes_per_token, estimate_peak, fit_advice, fit_keep_tokens,
                            pending_gradient_bytes, pick_chunk_size)
from .model import CausalLMAdapter, stage_layer_counts, stage_state_dict, trim_to_stage
from .model.build import build_model
from .model.offload import check_host_memory, host_bytes_needed, offloaded_layers
from .parallel import PipelineRollout, RankLayout
from .parallel.launch import init_distributed, resolve_device
from .planning.spans import load_planned_spans

log = logging.getLogger("rollout_dist")

def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


@dataclass
class StepStats:
    step: int
    loss: float
    tokens: int
    chunks: int
    seconds: float
    tokens_per_s: float
    peak_mem_gib: float
    lr: float
    grad_norm: float | None


CPU_AUTO_CHUNK = 512  # rollout.chunk_size=0 where there is no GPU memory to size it by
CHUNK_BAR_MIN = 32  # documents of at least this many chunks get a progress bar of their own within a step


class _ChunkBar:
    """Chunk progress within one long document (fill pass, then backward), below the step bar."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.desc != f"{phase} ({self.what})":
            self.close()
            self.bar = tqdm(total=total, desc=f"{phase} ({self.what})", unit="chunk", leave=False, position=1,
                            dynamic_ncols=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _restart_step_counts(optimizer) -> None:
    """DeepSpeed's fp16/bf16 wrappers for ZeRO-0 (FP16_Optimizer, FP16_UnfusedOptimizer) create the inner
    optimizer's states by stepping it once on zero gradients.  Adam's moments stay zero, but its step count starts
    at 1, so the first real step is bias-corrected as step 2: updates of about 0.7x AdamW's for the first tens of
    steps.  Set the counts back to 0, as a fresh optimizer has them (a resumed run loads its own afterwards)."""
    if type(optimizer).__name__ not in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):
        return
    inner = optimizer.optimizer
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = 0
    for state in inner.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


class Trainer:
    """Owns one training run; ``fit()`` runs it.  Construction checks every input and writes nothing."""

    def __init__(self, cfg: TrainConfig, resolved_config: str | None = None):
        if cfg.trainer.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.device = resolve_device(cfg.trainer.device)
        if cfg.model.dtype == "float64":
            raise ConfigError("model.dtype=float64 is for the API's exactness checks; DeepSpeed does not reduce "
                              "float64 gradients, so train in float32 or bfloat16")
        self.run_dir = Path(cfg.checkpoint.dir)
        self._check_run_dir()
        torch.manual_seed(cfg.trainer.seed)
        self.model, self.tokenizer = build_model(cfg.model, self.device)
        if cfg.trainer.optimizer_dtype == "bf16" and self.model.dtype != torch.bfloat16:
            raise ConfigError(f"trainer.optimizer_dtype=bf16 needs a bf16 model; model.dtype gives "
                              f"{str(self.model.dtype).replace('torch.', '')} on {self.device}: set "
                              "model.dtype=bfloat16 or trainer.optimizer_dtype=fp32")
        self.docs, self.data_report = load_documents(
            cfg.data.path, self.tokenizer, self.model.config.vocab_size, text_field=cfg.data.text_field,
            # a chunk index plans whole documents: never split them (0 = no limit, also for the bundled sample)
            max_doc_tokens=0 if cfg.data.chunk_index else cfg.data.max_doc_tokens,
            invalid_utf8=cfg.data.invalid_utf8,
            progress=os.environ.get("RANK", "0") == "0")
        self.rollout = ExactRollout(cfg.rollout.chunk_size or CPU_AUTO_CHUNK, attention=cfg.rollout.attention,
                                    keep_attention=cfg.rollout.keep_attention, offload=cfg.rollout.offload,
                                    vocab_tile=cfg.rollout.vocab_tile, keep_tokens=cfg.rollout.keep_attention_tokens,
                                    offload_layers=cfg.rollout.offload_layers)
        self.planned_spans = (load_planned_spans(cfg.data.chunk_index, self.docs, self.tokenizer)
                              if cfg.data.chunk_index else None)
        self._check_host_memory()
        self.engine = None
        self.step = 0

    # ----------------------------------------------------------------------------------------------- set-up
    def _check_host_memory(self) -> None:
        """Refuses up front, with the figures, a run whose offloaded K/V (longest document) and ZeRO-Offload
        optimizer (16 bytes per parameter in fp32, 8 in bf16, split over the data-parallel ranks) would not fit
        the host memory available now: otherwise the kernel kills the job mid-step, after the fill pass."""
        cfg = self.cfg
        parts = []
        if cfg.rollout.offload != "none" and self.docs:
            ad = CausalLMAdapter(self.model)
            layers = offloaded_layers(ad.num_layers, cfg.rollout.offload_layers)
            need = host_bytes_needed(cfg.rollout.offload, layers, self.longest_doc, ad.kv_heads, ad.head_dim,
                                     ad.dtype)
            parts.append((need, f"rollout.offload={cfg.rollout.offload} of {layers} layers for the longest "
                                f"document ({self.longest_doc} tokens)"))
        if cfg.trainer.offload_optimizer == "cpu":
            per_param = 8 if cfg.trainer.optimizer_dtype == "bf16" else 16
            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            par = cfg.parallel
            dp = par.dp or max(1, int(os.environ.get("WORLD_SIZE", "1")) // par.pp)  # ZeRO splits it over dp
            parts.append((n * per_param // dp, f"trainer.offload_optimizer=cpu ({per_param} bytes per parameter, "
                                               f"{cfg.trainer.optimizer_dtype})"))
        if not parts:
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # every process of this node offloads its own
        what = " + ".join(f"{w} {b / 2**30:.1f} GiB" for b, w in parts)
        try:
            check_host_memory(sum(b for b, _ in parts) * local,
                              what + (f", {local} processes on this node" if local > 1 else ""))
        except MemoryError as err:
            raise ConfigError(str(err)) from None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _check_run_dir(self) -> None:
        if self.cfg.checkpoint.resume:
            if not (self.checkpoint_dir / "latest").is_file():
                raise ConfigError(f"checkpoint.resume=true but checkpoint.dir={str(self.run_dir)!r} holds no "
                                  "training checkpoint (checkpoints/latest); start it with checkpoint.every=N")
            return
        if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            raise ConfigError(f"checkpoint.dir={str(self.run_dir)!r} already holds an earlier run; nothing is "
                              "overwritten: choose a new checkpoint.dir, move that run away, or continue it "
                              "with checkpoint.resume=true")

    def setup(self) -> None:
        """Process group, run directory, DeepSpeed engine; called by ``fit``."""
        import deepspeed

        init_distributed(self.device)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        par = self.cfg.parallel
        try:
            self.layout = RankLayout(par.pp, par.dp).build_groups()
            if par.pp > 1:
                counts = stage_layer_counts(self.model, par.pp, par.stage_layers, tokens=self.longest_doc)
                self.stage_info = trim_to_stage(self.model, self.layout.stage, counts)
                for p in self.model.parameters():
                    p.model_parallel = True  # unique to this stage: DeepSpeed sums its grad norm over stages
                self.rollout = PipelineRollout(self.rollout.chunk_size, self.layout,
                                               attention=self.cfg.rollout.attention,
                                               keep_attention=self.cfg.rollout.keep_attention,
                                               vocab_tile=self.cfg.rollout.vocab_tile,
                                               keep_tokens=self.cfg.rollout.keep_attention_tokens)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._add_file_log()
            if self.resolved_config is not None and not self.cfg.checkpoint.resume:
                (self.run_dir / "config.yaml").write_text(self.resolved_config)
        torch.distributed.barrier()
        if self.layout.dp > 1 and self.cfg.data.balance:
            from .planning.sharding import BalancedSharder
            self.order = BalancedSharder([len(d.input_ids) for d in self.docs], seed=self.cfg.trainer.seed,
                                         rank=self.layout.dp_rank, world=self.layout.dp)
        else:
            self.order = DocumentOrder(len(self.docs), seed=self.cfg.trainer.seed, rank=self.layout.dp_rank,
                                       world=self.layout.dp, shuffle=self.cfg.data.shuffle)
        ds_config = deepspeed_config(self.cfg, self.model.dtype, self.run_dir, self.device)
        if self.model.dtype == torch.bfloat16 and self.cfg.trainer.zero_stage == 0:
            log.warning("bf16 with trainer.zero_stage=0: DeepSpeed adds the gradients of all chunks in bf16; "
                        "trainer.zero_stage=2 adds them in fp32")
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                    config=ds_config, mpu=self.layout if par.pp > 1 else None)
        # DeepSpeed's schedulers start at iteration -1, i.e. lr 0, so the first step would not learn; place them
        # at iteration 0 (engine.step() advances them after every optimizer step)
        self.engine.lr_scheduler.step(0)
        _restart_step_counts(self.engine.optimizer)
        self.history: list[StepStats] = []
        if self.cfg.checkpoint.resume:
            self._load_checkpoint()
        if self.cfg.rollout.chunk_size == 0 and not self.planned_spans:
            self._pick_chunk_size()
        if self.device.type == "cuda":
            self._fit_kept_outputs()
        r = self.data_report
        ro, tr = self.cfg.rollout, self.cfg.trainer
        log.info("model: %s, %.2fM parameters, %s on %s; rollout: %s, chunk_size %d, K/V offload %s%s; "
                 "ZeRO stage %d%s", type(self.model).__name__,
                 sum(p.numel() for p in self.model.parameters()) / 1e6,
                 str(self.model.dtype).replace("torch.", ""), self.device, ro.mode, self.rollout.chunk_size,
                 ro.offload + (f" (first {ro.offload_layers} layers)" if ro.offload_layers else ""),
                 f", LM head in vocabulary tiles of {ro.vocab_tile}" if ro.vocab_tile else "", tr.zero_stage,
                 (f", optimizer ({tr.optimizer_dtype}) offloaded to {tr.offload_optimizer}"
                  if tr.offload_optimizer != "none" else ""))
        log.info("data: %d documents (%d tokens) from %d file(s); %d skipped as too short; %d extra pieces from "
                 "splitting long documents; %d data-parallel replica(s)%s", r.documents, r.tokens, r.files,
                 len(r.skipped_short), r.pieces_from_splits, self.layout.dp,
                 ", balanced by tokens and T^2" if type(self.order).__name__ == "BalancedSharder" else "")
        if par.pp > 1:
            log.info("pipeline: %d stages, decoder layers per stage %s", par.pp, counts)
        if self.device.type == "cuda":
            self._check_memory()
        log.info("run directory: %s", self.run_dir.resolve())

    @functools.cached_property
    def longest_doc(self) -> int:
        """Tokens of the longest training document: what memory is sized for."""
        return max(len(d.input_ids) for d in self.docs)

    @functools.cached_property
    def _activation_per_token(self) -> int:
        """Bytes autograd keeps per chunk token (engine/memory.py), counted once per run."""
        return activation_bytes_per_token(CausalLMAdapter(self.engine.module))

    def _pick_chunk_size(self, capacity: int | None = None) -> None:
        """rollout.chunk_size=0: the largest chunk whose predicted peak for the longest document fits the GPU;
        every rank takes the smallest pick so that all stages and replicas cut documents alike."""
        if self.device.type != "cuda" and capacity is None:
            log.info("rollout.chunk_size=0 on CPU: chunks of %d tokens", self.rollout.chunk_size)
            return
        ro = self.cfg.rollout
        if capacity is None:
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        longest = self.longest_doc
        # kept outputs are counted only when their amount is fixed; otherwise they get what the chunk leaves
        chunk = pick_chunk_size(CausalLMAdapter(self.engine.module), longest, capacity, offload=ro.offload,
                                keep_attention=ro.keep_attention and ro.keep_attention_tokens > 0,
                                vocab_tile=ro.vocab_tile, activation_per_token=self._activation_per_token,
                                keep_tokens=ro.keep_attention_tokens, offload_layers=ro.offload_layers,
                                fixed=self._fixed_bytes())
        chunk = self._smallest_over_ranks(chunk)
        self.rollout.chunk_size = chunk
        log.info("rollout.chunk_size=0: chunks of %d tokens, the largest predicted to fit %.1f GiB for the "
                 "longest document (%d tokens)", chunk, capacity / 2 ** 30, longest)

    def _fixed_bytes(self) -> int:
        """Device bytes that do not grow with the document: what is allocated now, plus the gradients the first
        backward creates (ZeRO 0 and 1 keep every parameter's in the model dtype; ZeRO 2 partitions them into
        buffers that exist already)."""
        now = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        if self.cfg.trainer.zero_stage >= 2:
            return now
        return now + pending_gradient_bytes(self.engine.module)

    def _smallest_over_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value``, so that all stages and replicas size memory alike."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t)

    def _largest_chunk(self) -> int:
        if not self.planned_spans:
            return self.rollout.chunk_size
        return max((e - s for spans in self.planned_spans.values() for s, e in spans), default=self.rollout.chunk_size)

    def _fit_kept_outputs(self, capacity: int | None = None) -> None:
        """rollout.keep_attention with keep_attention_tokens=0: every chunk's outputs if the longest document is
        predicted to fit with them, else those of as many last chunks as fit (none: keep_attention is dropped)."""
        ro = self.cfg.rollout
        if not ro.keep_attention or ro.keep_attention_tokens:
            return
        if capacity is None:
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        longest = self.longest_doc
        keep = self._smallest_over_ranks(fit_keep_tokens(
            CausalLMAdapter(self.engine.module), longest, self._largest_chunk(), capacity, offload=ro.offload,
            vocab_tile=ro.vocab_tile, activation_per_token=self._activation_per_token,
            offload_layers=ro.offload_layers, fixed=self._fixed_bytes()))
        if keep >= longest:
            return
        if keep == 0:
            self.rollout.keep_attention = False
            log.warning("rollout.keep_attention: no room for kept attention outputs beside a %d-token document in "
                        "%.1f GiB (engine/memory.py); running without them", longest, capacity / 2 ** 30)
            return
        self.rollout.keep_tokens = keep
        log.info("rollout.keep_attention: outputs kept for the last %d of the longest document's %d tokens, as "
                 "many as are predicted to fit %.1f GiB (rollout.keep_attention_tokens sets it)", keep, longest,
                 capacity / 2 ** 30)

    def predicted_peak(self):
        """The memory model's peak GPU memory (engine.memory.MemoryEstimate) of the longest document's step."""
        ro = self.cfg.rollout
        return estimate_peak(CausalLMAdapter(self.engine.module), self.longest_doc, self._largest_chunk(),
                             offload=ro.offload, keep_attention=self.rollout.keep_attention, vocab_tile=ro.vocab_tile,
                             activation_per_token=self._activation_per_token, keep_tokens=self.rollout.keep_tokens,
                             offload_layers=ro.offload_layers, fixed=self._fixed_bytes())

    def _check_memory(self, capacity: int | None = None) -> None:
        """Predicts the peak GPU memory of the longest document (engine/memory.py) and warns, with what to
        change, if it would not fit: the peak comes at the first backward chunk, after the whole fill pass."""
        ro = self.cfg.rollout
        keep = self.rollout.keep_attention
        est = self.predicted_peak()
        if capacity is None:
            capacity = torch.cuda.get_device_properties(self.device).total_memory
        log.info("GPU memory, predicted peak for the longest document: %s of %.1f GiB", est.describe(),
                 capacity / 2 ** 30)
        advice = fit_advice(est, capacity, ro.offload, keep, ro.offload_layers)
        if advice:
            log.warning("%s", advice)

    def _add_file_log(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)

    # ------------------------------------------------------------------------------------------------ steps
    def accumulate(self, window: list[Document]) -> tuple[float, int, int]:
        """Runs the rollouts of one accumulation window; gradients end up in the engine, no optimizer step.

        Returns (sum of token losses, target tokens, chunks).  Each chunk's backward goes through
        ``engine.backward``; only the very last one of the window is an accumulation boundary, where DeepSpeed
        reduces gradients across data-parallel ranks.
        """
        engine = self.engine
        window_tokens = sum(len(d.input_ids) - 1 for d in window)
        normalizer = float(window_tokens)
        if self.layout.dp > 1:
            # DeepSpeed averages gradients over replicas: divide by the tokens of all replicas' windows over dp,
            # so the step equals one batch of every replica's documents
            total = torch.tensor([window_tokens], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(total, group=self.layout.data_parallel_group())
            normalizer = float(total) / self.layout.dp
        loss_sum, chunks = 0.0, 0
        for i, doc in enumerate(window):
            ids = torch.tensor([doc.input_ids], device=self.device)
            spans = self.planned_spans[doc.id] if self.planned_spans else self.rollout.spans(ids.shape[1])
            calls, n_chunks, last_doc = 0, len(spans), i == len(window) - 1

            def backward(loss, _last=last_doc, _n=n_chunks):
                nonlocal calls
                calls += 1
                engine.set_gradient_accumulation_boundary(_last and calls == _n)
                engine.backward(loss)

            extra = {}
            if isinstance(self.rollout, ExactRollout) and self.rank == 0 and n_chunks >= CHUNK_BAR_MIN:
                extra["progress"] = _ChunkBar(f"document {i + 1}/{len(window)}, {ids.shape[1]:,} tokens")
            try:
                result = self.rollout.run(engine.module, ids, loss_normalizer=normalizer, backward=backward,
                                          spans=spans, **extra)
            finally:
                if extra:
                    extra["progress"].close()
            loss_sum += result.loss_sum
            chunks += result.num_chunks
        return loss_sum, window_tokens, chunks

    def train_step(self) -> StepStats:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        window = [self.docs[self.order.next()] for _ in range(self.cfg.trainer.grad_accum)]
        loss_sum, tokens, chunks = self.accumulate(window)
        lr = self.engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
        self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.step += 1
        first = self.layout.is_first_stage  # every stage sees the same tokens: count them once per pipeline
        totals = torch.tensor([loss_sum if self.layout.is_last_stage else 0.0, tokens if first else 0,
                               chunks if first else 0], dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            torch.distributed.all_reduce(totals)
        loss_sum, tokens, chunks = totals.tolist()
        grad_norm = self.engine.get_global_grad_norm()
        return StepStats(step=self.step, loss=loss_sum / tokens, tokens=int(tokens), chunks=int(chunks),
                         seconds=seconds, tokens_per_s=tokens / seconds, peak_mem_gib=peak_memory_gib(self.device),
                         lr=lr,
                         grad_norm=None if grad_norm is None else float(grad_norm))

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self) -> list[StepStats]:
        self.setup()
        history = self.history
        every = self.cfg.checkpoint.every
        bar = tqdm(total=self.cfg.trainer.max_steps, initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0, dynamic_ncols=True, file=sys.stderr)
        while self.step < self.cfg.trainer.max_steps:
            stats = self.train_step()
            history.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{stats.tokens_per_s:,.0f}")
            if self.rank == 0 and (stats.step % self.cfg.trainer.log_every == 0 or stats.step == 1):
                bar.write(f"step {stats.step:>5}  loss {stats.loss:.4f}  tokens {stats.tokens:>8}  "
                          f"chunks {stats.chunks:>4}  {stats.tokens_per_s:>10,.0f} tok/s  "
                          f"peak {stats.peak_mem_gib:.2f} GiB  lr {stats.lr:.2e}"
                          + (f"  grad_norm {stats.grad_norm:.3g}" if stats.grad_norm is not None else ""))
                log.debug("step %s", asdict(stats))
            self._tensorboard(stats)
            if every and (self.step % every == 0 or self.step == self.cfg.trainer.max_steps):
                self._save_checkpoint()
        bar.close()
        self._finish(history)
        return history

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        """A DeepSpeed checkpoint of every rank (weights, optimizer, LR schedule) plus what the loop needs:
        step, data position, random state, history.  DeepSpeed points ``latest`` at it only once it is written,
        so a crash while saving leaves the previous checkpoint as the one to resume from."""
        tag = f"step{self.step:08d}"
        state = {"step": self.step, "order": self.order.state_dict(), "cpu_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                 "history": [asdict(s) for s in self.history]}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=state)
        torch.distributed.barrier()
        if self.rank == 0:
            import shutil
            tags = sorted(p for p in self.checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
            for old in tags[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("saved training checkpoint %s", self.checkpoint_dir / tag)

    def _load_checkpoint(self) -> None:
        path, state = self.engine.load_checkpoint(str(self.checkpoint_dir))
        if path is None or state is None:
            raise ConfigError(f"could not load the training checkpoint in {self.checkpoint_dir}")
        self.step = int(state["step"])
        self.order.load_state_dict(state["order"])
        torch.set_rng_state(state["cpu_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = [StepStats(**h) for h in state.get("history", [])]
        log.info("resumed from %s at step %d", path, self.step)

    def _tensorboard(self, s: StepStats) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not monitor.enabled:
            return
        monitor.write_events([("train/loss", s.loss, s.step), ("train/tokens_per_s", s.tokens_per_s, s.step),
                              ("train/peak_mem_gib", s.peak_mem_gib, s.step), ("train/chunks", s.chunks, s.step),
                              ("train/lr", s.lr, s.step)])

    def _gather_full_state(self) -> dict | None:
        """The whole model's state dict on global rank 0 (stages of replica 0 send theirs), None elsewhere."""
        if self.layout.pp == 1:
            return None
        shards = [None] * self.layout.pp if self.rank == 0 else None
        if self.layout.dp_rank == 0:
            torch.distributed.gather_object(stage_state_dict(self.engine.module), shards, dst=0,
                                            group=self.layout.pipeline_group())
        if self.rank != 0:
            return None
        return {k: v for shard in shards for k, v in shard.items()}

    def close(self) -> None:
        """Ends the process group once every rank is done (rank 0 writes the final model last): a rank leaving
        with its group alive can abort at exit ("terminate called without an active exception", seen with
        gloo under torchrun). For the entry point; a process that trains again keeps its group."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def _finish(self, history: list[StepStats]) -> None:
        torch.distributed.barrier()
        full_state = self._gather_full_state() if self.cfg.checkpoint.save_final else None
        if self.rank != 0:
            return
        summary = {"steps": len(history), "first_loss": history[0].loss, "last_loss": history[-1].loss,
                   "losses": [s.loss for s in history],
                   "tokens": sum(s.tokens for s in history), "seconds": sum(s.seconds for s in history),
                   "peak_mem_gib": max(s.peak_mem_gib for s in history)}
        if self.cfg.checkpoint.save_final:
            final = self.run_dir / "final"
            model = self.engine.module
            if full_state is not None:
                model, _ = build_model(self.cfg.model, torch.device("cpu"))
                model.load_state_dict(full_state, strict=True)
            model.save_pretrained(final)
            self.tokenizer.save_pretrained(final)
            summary["final_model"] = str(final)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("done: %d steps, loss %.4f -> %.4f; %s", summary["steps"], summary["first_loss"],
                 summary["last_loss"], f"model saved to {summary['final_model']}" if "final_model" in summary
                 else "final model not saved (checkpoint.save_final=false)")
