"""The training loop, composed of the roles in rollout_dist/train/.

Every input is checked before anything is written: the run directory is created only once the model and the
documents have loaded, and it must not already hold a run.  One optimizer step = ``trainer.grad_accum``
documents per rank, each run through the configured rollout; the loss of the step is normalised by the target
tokens of the whole window (of all replicas), so accumulating k documents equals one batch of those k documents.

Memory mode (``rollout.mode=memory``) trains a ``MemoryModel`` with ``MemoryRollout``: the model set-up wraps the
HF model, the engine set-up gives the memory's parameters their own optimizer group, the data pipeline applies
the segment-count curriculum, and ``ChunkLog`` records every chunk's loss weight, topic shift and damping.

Seams for what runs beside the loop (a coordinator, say): ``step_hooks`` are called with every step's
``StepStats`` after the metrics sinks and the checkpoint; ``chunk_hooks`` are handed to the rollout, which calls
them with a ``ChunkEvent`` after every chunk of every document.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import ConfigError, TrainConfig
from .data import Document
from .engine import RandomStreams, Rollout, make_rollout
from .engine.budget import PeakEstimate
from .engine.rollout import ChunkHook
from .parallel import RankLayout
from .checkpoint.store import SnapshotError
from .train.checkpointing import Checkpointer, SnapshotCheckpointer, check_run_dir
from .train.chunk_snapshots import ChunkSnapshotter
from .train.context import RunContext
from .train.data_pipeline import ChunkedDocument, Curriculum, DataPipeline
from .train.engine_setup import initialize_engine
from .train.export import export_final
from .train.metrics import (ChunkLog, ConsoleSink, JsonlSink, MetricsSink, StepStats, TensorBoardSink, TrainLog,
                            chunk_bar, peak_memory_gib)
from .train.model_setup import build_trainable_model, model_dtype, trim_to_this_stage
from .train.planner import MemoryPlanner, check_host_fits
from .train.verification import DivergenceError, Resync, Verifier

log = logging.getLogger("rollout_dist")

StepHook = Callable[[StepStats], None]

__all__ = ["DivergenceError", "StepStats", "Trainer"]


class Trainer:
    """Owns one training run; ``fit()`` runs it.  Construction checks every input and writes nothing."""

    def __init__(self, cfg: TrainConfig, resolved_config: str | None = None, *, step_hooks: Sequence[StepHook] = (),
                 chunk_hooks: Sequence[ChunkHook] = ()):
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.context = RunContext(cfg.trainer.device)
        self.device = self.context.device
        self.run_dir = Path(cfg.checkpoint.dir)
        self.checkpointer: Checkpointer = SnapshotCheckpointer(cfg.checkpoint, self.run_dir, cfg.trainer.zero_stage,
                                                               resolved_config)
        check_run_dir(self.run_dir, cfg.checkpoint.resuming, self.checkpointer)
        torch.manual_seed(cfg.trainer.seed)
        self.model, self.tokenizer = build_trainable_model(cfg, self.device)
        memory = cfg.rollout.mode == "memory"
        self.data = DataPipeline(cfg.data, self.tokenizer, self.model.config.vocab_size, seed=cfg.trainer.seed,
                                 progress=os.environ.get("RANK", "0") == "0", mode=cfg.rollout.mode,
                                 curriculum=(Curriculum(cfg.memory.curriculum, cfg.memory.curriculum_steps)
                                             if memory and cfg.memory.curriculum else None))
        # one process's rollout until set-up knows the layout (a pipeline stage's then replaces it)
        self.rollout = self._make_rollout(None)
        check_host_fits(cfg, self.model, self.data.longest_doc)
        self.streams = RandomStreams(cfg.trainer.seed)
        self.step_hooks: list[StepHook] = list(step_hooks)
        self.chunk_hooks: list[ChunkHook] = list(chunk_hooks)
        self.engine = None
        self.chunk_snapshots: ChunkSnapshotter | None = None
        self.memory: MemoryPlanner | None = None
        self.verifier: Verifier | None = None
        self.train_log: TrainLog | None = None
        self.chunk_log: ChunkLog | None = None
        self.step = 0
        self.history: list[StepStats] = []

    # what the roles own, under the names scripts and tests use ------------------------------------------------
    docs = property(lambda self: self.data.docs)
    data_report = property(lambda self: self.data.report)
    planned_spans = property(lambda self: self.data.planned_spans)
    longest_doc = property(lambda self: self.data.longest_doc)
    layout = property(lambda self: self.context.layout)
    rank = property(lambda self: self.context.rank)
    world = property(lambda self: self.context.world)

    def predicted_peak(self) -> PeakEstimate:
        """The memory model's peak GPU memory of the longest document's step (after ``setup``)."""
        return self.memory.predicted_peak()

    # ----------------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Process group, stage, run directory, DeepSpeed engine, resumed state, memory plan; called by ``fit``."""
        cfg = self.cfg
        layout = self.context.start(cfg.parallel)
        counts = None
        if layout.pp > 1:
            counts = trim_to_this_stage(self.model, cfg.parallel, layout, self.longest_doc, self.device)
            self.rollout = self._make_rollout(layout, self.rollout.chunk_size)
        self._open_run_dir()
        self.data.start(layout)
        self.engine = initialize_engine(cfg, self.model, layout, self.run_dir, self.device)
        self.checkpointer.bind(self.engine, self.context)
        self.chunk_snapshots = self._chunk_snapshotter()
        self.memory = MemoryPlanner(cfg, self.rollout, self.engine.module, self.data, self.context)
        if cfg.checkpoint.resuming:
            self.resume()
        if cfg.rollout.mode == "memory":  # after a resume: its chunks.jsonl continues from the resumed step
            self.chunk_log = ChunkLog(self.run_dir / "chunks.jsonl" if self.context.is_main else None, self.step,
                                      cfg.trainer.log_every, self.context, self.train_log)
        self.memory.plan()
        self._log_setup(counts)
        if self.device.type == "cuda":
            self.memory.check()
        if cfg.coordinator.enabled:
            self.verifier = Verifier(cfg, self.context, self.engine, self.rollout,
                                     getattr(self.checkpointer, "store", None))
            self.checkpointer.gate = self.verifier.gate
            self.checkpointer.digest_files = self.verifier.digest_files
            self.verifier.start(self.step)
        log.info("run directory: %s", self.run_dir.resolve())

    def _chunk_snapshotter(self) -> ChunkSnapshotter | None:
        ck = self.cfg.checkpoint  # TrainConfig refused chunk snapshots where they cannot resume (pp > 1)
        if not ck.chunk_every:
            return None
        return ChunkSnapshotter(ck.chunk_every, self.checkpointer.store, self.rank, ck.background)

    def _make_rollout(self, layout: RankLayout | None, chunk_size: int | None = None) -> Rollout:
        """The config's rollout for ``layout`` (None: one process); ``chunk_size`` overrides the config's."""
        try:
            return make_rollout(self.cfg.rollout, layout, chunk_size=chunk_size, memory=self.cfg.memory,
                                tokenizer=self.tokenizer)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _open_run_dir(self) -> None:
        """Rank 0 creates the run directory, starts train.log and writes the resolved config (not on resume:
        the run's config is there); the other ranks wait for it."""
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.train_log = TrainLog(self.run_dir / "train.log", self.cfg.trainer.log_every)
            config = self.run_dir / "config.yaml"
            if self.resolved_config is not None and not (self.cfg.checkpoint.resuming and config.exists()):
                config.write_text(self.resolved_config)
        self.context.barrier()

    def _log_setup(self, stage_counts: list[int] | None) -> None:
        ro, tr = self.cfg.rollout, self.cfg.trainer
        log.info("model: %s, %.2fM parameters, %s on %s; rollout: %s, chunk_size %d, K/V offload %s%s; "
                 "ZeRO stage %d%s", type(self.model).__name__,
                 sum(p.numel() for p in self.model.parameters()) / 1e6,
                 str(model_dtype(self.model)).replace("torch.", ""), self.device, ro.mode, self.rollout.chunk_size,
                 ro.offload + (f" (first {ro.offload_layers} layers)" if ro.offload_layers else ""),
                 f", LM head in vocabulary tiles of {ro.vocab_tile}" if ro.vocab_tile else "", tr.zero_stage,
                 (f", optimizer ({tr.optimizer_dtype}) offloaded to {tr.offload_optimizer}"
                  if tr.offload_optimizer != "none" else ""))
        log.info("data: %s; %d data-parallel replica(s)%s", self.data.describe(), self.layout.dp,
                 ", balanced by tokens and T^2" if self.data.balanced else "")
        if stage_counts is not None:
            log.info("pipeline: %d stages, decoder layers per stage %s", self.layout.pp, stage_counts)
        if ro.mode == "memory":
            mem = self.cfg.memory
            log.info("memory mode: %d slots per layer, state in %s%s; loss weighting %s; backpropagation through %s"
                     "; per-chunk records in %s", mem.slots, str(self.model.state_dtype).replace("torch.", ""),
                     " (ablated: the state is zeroed every chunk)" if mem.ablate else "", ro.loss_weighting,
                     f"at most {ro.bptt_chunks} chunks" if ro.bptt_chunks else "every chunk",
                     self.run_dir / "chunks.jsonl")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint keeps beside the engine's state: step, data position, random state, history.  (The
        rollouts' dropout masks come from ``self.streams``, keyed by step and document; the torch generators
        are kept for anything else that draws from them.)"""
        return {"step": self.step, "order": self.data.state_dict(), "streams": self.streams.state_dict(),
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "history": [asdict(s) for s in self.history]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("streams", {}).get("seed", self.streams.seed)
        if saved != self.streams.seed:  # every dropout mask would differ from the run being continued
            raise ConfigError(f"trainer.seed={self.streams.seed}, but the snapshot's run used trainer.seed={saved}: "
                              "resume with the same seed")
        self.step = int(state["step"])
        self.data.load_state_dict(state["order"])
        torch.set_rng_state(state["cpu_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = [StepStats(**h) for h in state.get("history", [])]

    def save_checkpoint(self) -> None:
        """A checkpoint of the engine and of ``state_dict()`` at the current step (every rank calls it)."""
        self.checkpointer.save(self.step, self.state_dict())

    def resume(self) -> None:
        """Loads the snapshot ``checkpoint.resume`` names (or the newest valid one) into the engine and the loop;
        with none valid the run starts from scratch."""
        state = self.checkpointer.load()
        if state is None:
            return
        self.load_state_dict(state)
        log.info("resumed at step %d", self.step)

    def _checkpoint_if_due(self, stats: StepStats) -> None:
        self.checkpointer.poll()  # a snapshot whose background write failed stops the run here
        every, last = self.cfg.checkpoint.every, self.cfg.trainer.max_steps
        if every and (stats.step % every == 0 or stats.step == last):
            self.save_checkpoint()
            stats.snapshot_block_s = getattr(self.checkpointer, "last_block_s", None)
            stats.snapshot_wait_s = getattr(self.checkpointer, "last_wait_s", None)

    # ------------------------------------------------------------------------------------------------ steps
    def accumulate(self, window: list[Document]) -> tuple[float, int, int]:
        """Runs the rollouts of one accumulation window; gradients end up in the engine, no optimizer step.

        Returns (sum of token losses, target tokens, chunks).  Each chunk's backward goes through
        ``engine.backward``; only the very last one of the window is an accumulation boundary, where DeepSpeed
        reduces gradients across data-parallel ranks.  Each document draws from its random stream at
        ``self.step``, the 0-based index of the step being computed.
        """
        pieces = [self.data.chunked(doc, self.rollout, self.step) for doc in window]
        window_tokens = sum(p.targets for p in pieces)
        normalizer = float(window_tokens)
        if self.layout.dp > 1:
            # DeepSpeed averages gradients over replicas: divide by the tokens of all replicas' windows over dp,
            # so the step equals one batch of every replica's documents
            total = torch.tensor([window_tokens], dtype=torch.float64, device=self.device)
            total = self.context.sum_over_ranks(total, self.layout.data_parallel_group())
            normalizer = float(total) / self.layout.dp
        loss_sum, chunks = 0.0, 0
        for i, piece in enumerate(pieces):
            spans = piece.spans
            bar = (chunk_bar(f"document {i + 1}/{len(window)}, {len(piece.input_ids):,} tokens", len(spans))
                   if self.context.is_main else None)
            stream = self.streams.document(self.step, piece.stream_id)
            input_ids = torch.tensor([piece.input_ids], device=self.device)
            state, doc_hooks = None, []
            if self.verifier is not None:
                doc_hooks = self.verifier.document(piece.stream_id, input_ids, spans, stream)
            if self.chunk_snapshots is not None:
                state, chunk_hooks = self.chunk_snapshots.document(
                    self.rollout, self.engine.module, step=self.step, base_version=self.checkpointer.base_step,
                    first_in_window=i == 0, length=len(piece.input_ids), stream=stream, spans=spans)
                doc_hooks = [*chunk_hooks, *doc_hooks]
                resumed = self.chunk_snapshots.resumes
                if self.verifier is not None and resumed and resumed[-1][0] == self.step and state is not None \
                        and state.fill_chunks == resumed[-1][1]:
                    self.verifier.check_resumed(state, resumed[-1][1])
            try:
                result = self.rollout.run(self.engine.module, input_ids,
                                          loss_normalizer=normalizer, spans=spans,
                                          backward=self._chunk_backward(i == len(window) - 1, len(spans)),
                                          stream=stream, state=state, hooks=[*doc_hooks, *self.chunk_hooks],
                                          progress=bar, **self._planned(piece))
            finally:
                if bar is not None:
                    bar.close()
                if self.chunk_snapshots is not None:
                    self.chunk_snapshots.finish(state)
            loss_sum += result.loss_sum
            chunks += result.num_chunks
            if self.chunk_log is not None:
                self.chunk_log.add(self.step + 1, piece.stream_id, self.rollout.last_chunks)
        return loss_sum, window_tokens, chunks

    @staticmethod
    def _planned(piece: ChunkedDocument) -> dict:
        """What a memory-mode chunk index adds to a rollout's arguments: the planner's boundary scores."""
        return {} if piece.boundary_scores is None else {"boundary_scores": piece.boundary_scores}

    def _chunk_backward(self, closes_window: bool, chunks: int):
        """``engine.backward`` for one document's chunk losses.  The document's last chunk is the accumulation
        boundary (DeepSpeed reduces gradients over replicas there) if the document is the window's last."""
        engine, calls = self.engine, 0

        def backward(loss: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            engine.set_gradient_accumulation_boundary(closes_window and calls == chunks)
            engine.backward(loss)
        return backward

    def train_step(self) -> StepStats:
        """One optimizer step over this rank's next window; the statistics are reduced over all ranks."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        if self.verifier is not None:
            self.verifier.begin_step(self.step + 1)
        loss_sum, tokens, chunks = self.accumulate(self.data.next_window(self.cfg.trainer.grad_accum))
        lr = self.engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
        if self.verifier is not None:
            self.verifier.before_optimizer()  # raises on a disagreement of the previous step (the policy's)
        self.engine.step()
        if self.verifier is not None:
            self.verifier.after_optimizer()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.step += 1
        first = self.layout.is_first_stage  # every stage sees the same tokens: count them once per pipeline
        totals = torch.tensor([loss_sum if self.layout.is_last_stage else 0.0, tokens if first else 0,
                               chunks if first else 0], dtype=torch.float64)
        loss_sum, tokens, chunks = self.context.sum_over_ranks(totals).tolist()
        if self.chunk_log is not None:
            self.chunk_log.end_step(self.step)  # collective: every rank's chunk records to rank 0
        grad_norm = self.engine.get_global_grad_norm()
        return StepStats(step=self.step, loss=loss_sum / tokens, tokens=int(tokens), chunks=int(chunks),
                         seconds=seconds, tokens_per_s=tokens / seconds, peak_mem_gib=peak_memory_gib(self.device),
                         lr=lr, grad_norm=None if grad_norm is None else float(grad_norm))

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self) -> list[StepStats]:
        """Sets up, steps to ``trainer.max_steps``, exports the final model; returns every step's stats, those
        before a resume included."""
        try:
            self.setup()  # a store that cannot be prepared fails here, after train.log has opened
            self._steps()
            export_final(self.cfg, self.run_dir, self.engine.module, self.tokenizer, self.history, self.context)
        except SnapshotError as err:  # in train.log too, which closes below
            log.error("%s", err)
            raise
        except DivergenceError as err:  # every rank stops here, at the same step
            log.error("%s", err)
            self.checkpointer.close()  # the unagreed snapshot is withheld, not half-published
            raise
        finally:
            if self.verifier is not None:
                self.verifier.close()
            self._close_train_log()  # after the export: its lines belong to the run's log too
        return self.history

    def _steps(self) -> None:
        """The loop: each step's stats go to the metrics sinks, the checkpointer and the step hooks, in order."""
        sinks = self._open_sinks()
        reporters = [*sinks, *([self.train_log] if self.train_log is not None else [])]
        if self.chunk_log is not None and self.context.is_main:
            reporters.append(self.chunk_log)  # its summary line in train.log after the step's
        hooks = [self._checkpoint_if_due, *(r.on_step for r in reporters), *self.step_hooks]
        try:
            while True:
                try:
                    while self.step < self.cfg.trainer.max_steps:
                        stats = self.train_step()
                        self.history.append(stats)
                        for hook in hooks:
                            hook(stats)
                    if self.verifier is not None:
                        self.verifier.finish()  # the last step's verdict
                    break
                except Resync as request:  # coordinator.on_mismatch=resync: back to an agreed step, then on
                    self._resync(request)
            self.checkpointer.close()  # the last snapshot is committed before the run reports success
        finally:
            for sink in sinks:
                sink.close()
            if self.chunk_log is not None:
                self.chunk_log.close()

    def _resync(self, request: Resync) -> None:
        """Every rank (all act on the same verdict) reloads the newest snapshot of an agreed step."""
        for line in request.lines:
            log.warning("%s", line)
        state = self.checkpointer.load(at_most=request.agreed)
        if state is None:
            raise DivergenceError(f"coordinator.on_mismatch=resync, but no snapshot of an agreed step (at most "
                                  f"{request.agreed}) exists to roll back to: set checkpoint.every; stopping")
        self.load_state_dict(state)
        self.engine.zero_grad()  # the abandoned step's gradients
        self.verifier.rolled_back(self.step)
        log.warning("resync: every rank rolled back to step %d and continues from there", self.step)

    def _open_sinks(self) -> list[MetricsSink]:
        """Where rank 0 reports each step (the other ranks report nothing); train.log, open since set-up, gets
        the step lines too."""
        if not self.context.is_main:
            return []
        tr = self.cfg.trainer
        sinks: list[MetricsSink] = [ConsoleSink(tr.max_steps, self.step, tr.log_every),
                                    JsonlSink(self.run_dir / "metrics.jsonl", self.step)]
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            sinks.append(TensorBoardSink(monitor))
        return sinks

    def _close_train_log(self) -> None:
        if self.train_log is not None:
            self.train_log.close()
            self.train_log = None

    def close(self) -> None:
        """Ends the process group once every rank is done; for the entry point (see ``RunContext.close``)."""
        self._close_train_log()
        self.context.close()
