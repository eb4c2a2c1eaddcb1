"""The trainer's verification role: every rank's digests to the coordinator, each step's checks, and what a
mismatch does (``coordinator.on_mismatch``).

Per step s (1-based), on every rank:

1. Before the first forward: the configured fault fires (tests only).
2. During the rollouts: each chunk's K/V as the fill pass wrote them (``STATE``, with top-K), and in the backward
   pass as the recompute made them (``RECOMPUTE``) and as the state still held them (``STORED``), per layer and
   tensor, reduced on the device (rollout_dist.coordinator.digest); pipeline stages also digest every hidden
   state and gradient they send and receive.
3. Before the optimizer step: the chunk checks (recompute and stored copy against the fill pass; a mismatch is
   replayed: the chunk is re-run forward from the document's start with the same random stream, and the fault is
   called transient if the replay gives the fill pass's value, persistent if it repeats the bad one), and the
   at-rest checks (every parameter and optimizer tensor hashed again and compared with its hash after step s-1:
   nothing may change them in between).  Findings go to the coordinator as ``MISMATCH`` records.  Then the rank
   waits for the coordinator's verdict on step s-1 (at most ``coordinator.timeout_s``) and acts on it.
4. After the optimizer step: parameters and optimizer tensors hashed (``PARAM``, ``OPTIM``), the top-K of each
   parameter's update (``UPDATE``), then ``STEP_END``.  The coordinator compares parameters across each stage's
   data-parallel replicas (optimizer tensors too at ZeRO 0), and what stages sent against what was received.

In memory mode (``rollout.mode=memory``) there are no K/V to digest (the carried state is a few slots per layer,
recomputed from the stored boundary states): the chunk checks of 2 and 3 are skipped, which set-up logs, and the
parameter and optimizer checks of 3 and 4 run as above.

Every rank acts on the same verdict at the same point (before step s+1's optimizer step, or after the last step),
so a halt or a rollback needs no extra agreement.  A snapshot of step s is published only once step s's verdict
says it agrees (``gate``, called by rank 0's background writer).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..checkpoint.store import digest_log_name
from ..config import ConfigError, TrainConfig
from ..coordinator import digest as dg
from ..coordinator.service import (CoordinatorClient, CoordinatorLost, Hub, MpiHubLink, MpiRankLink, TcpHubLink,
                                   TcpRankLink)
from ..engine.rollout import ChunkEvent
from ..model import CausalLMAdapter
from ..parallel.launch import launched_by_mpi
from .faults import FaultInjector

log = logging.getLogger("rollout_dist")

LOG_MEMORY_BYTES = 512 << 20
"""Rank 0 keeps the ordered digests of the steps since the last snapshot in memory, at most this much."""


class DivergenceError(RuntimeError):
    """A check failed (or the coordinator was lost) under ``coordinator.on_mismatch=halt``: the run stops."""


class Resync(Exception):
    """``coordinator.on_mismatch=resync``: roll back to the snapshot of step ``agreed`` (or older) and go on."""

    def __init__(self, agreed: int, lines: list[str]):
        super().__init__(f"roll back to step {agreed}")
        self.agreed, self.lines = agreed, lines


@dataclass
class _Doc:
    doc_id: int
    input_ids: torch.Tensor
    spans: list
    stream: object


def optimizer_tensors(engine) -> list[tuple[str, torch.Tensor]]:
    """This rank's optimizer tensors, named: fp32 master partitions (ZeRO 1/2, or a mixed-precision wrapper's
    masters) and every state tensor of the base optimizer (exp_avg, exp_avg_sq, ...), in a stable order."""
    opt = engine.optimizer
    base = opt.optimizer if hasattr(getattr(opt, "optimizer", None), "param_groups") else opt
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = []
    for g, group in enumerate(base.param_groups):
        for i, p in enumerate(group["params"]):
            name = names.get(id(p), f"group{g}.partition{i}")
            if id(p) not in names:
                out.append((f"optimizer.{name}.master", p))
            for key, value in sorted(base.state.get(p, {}).items()):
                if torch.is_tensor(value) and value.numel() > 1:
                    out.append((f"optimizer.{name}.{key}", value))
    return out


class Verifier:
    """One rank's part of the checks (module docstring); ``start`` after the engine exists (and a resume)."""

    def __init__(self, cfg: TrainConfig, context, engine, rollout, store=None):
        self.cfg, self.co, self.context, self.engine, self.rollout = cfg, cfg.coordinator, context, engine, rollout
        self.layout, self.rank = context.layout, context.rank
        self.device = context.device
        self.store = store
        self.faults = FaultInjector(cfg.fault, self.rank)
        self.chunk_checks = cfg.rollout.mode == "exact"
        """Whether chunks carry K/V to check (not in memory mode: module docstring)."""
        self.k = self.co.topk
        self.client: CoordinatorClient | None = None
        self.hub: Hub | None = None
        self.lost = False  # the coordinator was lost and the policy carries on unchecked
        self.step = 0  # the 1-based step being computed
        self.docs: list[_Doc] = []
        self.doc: _Doc | None = None
        self.chunk_of: dict[int, int] = {}
        self.replaying = False
        self.pending: dict[tuple[str, int], list] = defaultdict(list)  # (phase, chunk start) -> reductions
        self.chunk_red: list[tuple] = []  # (kind, doc, chunk, layer, name, Reduction, phase)
        self.step_red: list[tuple] = []  # (kind, name, Reduction)
        self.last_hash: dict[tuple[int, str], int] = {}  # (PARAM|OPTIM, name) -> hash after the last step
        self.before: dict[str, torch.Tensor] = {}
        self.verdicts: dict[int, list[str]] = {}
        self.verdict_cond = threading.Condition()
        self.agreed = 0  # the newest step every check agreed on
        self.submitted = -1  # the newest step whose records (STEP_END included) went to the coordinator
        self.seconds: dict[str, float] = defaultdict(float)  # wall time of the step-level work (benchmarks)
        self._said_no_room = False
        self.findings: list[dg.Digest] = []  # this step's mismatches found outside the chunk and at-rest checks
        self.log_lock = threading.Lock()
        self.unlogged: dict[int, bytes] = {}  # rank 0: ordered batches not yet persisted with a snapshot
        self.unlogged_bytes = 0
        self._said_log_full = False

    # ------------------------------------------------------------------------------------------------ set-up
    def start(self, step: int) -> None:
        """Opens the link to the coordinator (rank 0 also starts it), hooks the rollout, and takes the at-rest
        hashes of the state the run starts from (step ``step``: 0, or the step a resume continues)."""
        self.agreed = step
        self._open()
        if not self.chunk_checks:
            log.info("coordinator: rollout.mode=%s carries no K/V, so the chunk K/V checks (fill pass against the "
                     "backward recompute, replay) are skipped; parameters and optimizer state are checked every step "
                     "(at rest and across replicas)", self.cfg.rollout.mode)
        records = self.attach(step)
        if step and self.store is not None:
            self._check_against_log(step, records)

    def attach(self, step: int) -> list[dg.Digest]:
        """Hooks the rollout (chunk K/V, pipeline transfers) and takes the at-rest hashes of the state at
        ``step``; returns those records.  ``detach`` undoes the hooks (a benchmark's unchecked steps)."""
        if self.chunk_checks:
            self.rollout.state_observer = self
        if hasattr(self.rollout, "p2p_watch"):
            self.rollout.p2p_watch = self._on_p2p
        self.chunk_red, self.step_red, self.pending = [], [], defaultdict(list)
        self._hash_step_tensors(dg.PARAM, dg.OPTIM, k=0)
        self._sync()
        records = self._finish_step_records(step)
        for r in records:
            self.last_hash[(r.kind, r.name)] = r.hash
        return records

    def detach(self) -> None:
        self.rollout.state_observer = None
        if hasattr(self.rollout, "p2p_watch"):
            self.rollout.p2p_watch = None

    def _open(self) -> None:
        world, transport = self.context.world, self.co.transport
        if transport == "auto":
            transport = "mpi" if launched_by_mpi() else "tcp"
        stages = {r: r % self.layout.pp for r in range(world)}
        stall_at, kill_at = self.faults.coordinator_fault()
        if transport == "mpi":
            from mpi4py import MPI
            comm = MPI.COMM_WORLD.Dup()  # collective: every rank, now, before training
            if self.rank == 0:
                self.hub = Hub(MpiHubLink(comm), world, stages, self.cfg.trainer.zero_stage, self._on_batch,
                               stall_at, kill_at)
                self.hub.start()
            link = MpiRankLink(comm)
        else:
            address = None
            if self.rank == 0:
                try:
                    hub_link = TcpHubLink(self.co.port)
                except OSError as err:
                    raise ConfigError(f"coordinator.port={self.co.port}: rank 0 cannot listen there ({err}); pick "
                                      "a free port, 0 for any, or set coordinator.enabled=false") from None
                self.hub = Hub(hub_link, world, stages, self.cfg.trainer.zero_stage, self._on_batch, stall_at,
                               kill_at)
                self.hub.start()
                address = (os.environ.get("MASTER_ADDR") if world > 1 else None) or "127.0.0.1", hub_link.port
            if world > 1:
                box = [address]
                torch.distributed.broadcast_object_list(box, src=0)
                address = box[0]
            try:
                link = TcpRankLink(tuple(address), self.rank, self.co.timeout_s)
            except OSError as err:
                raise DivergenceError(f"rank {self.rank} cannot reach the coordinator at {address[0]}:{address[1]} "
                                      f"({err}); set coordinator.port to a port open between the nodes, or "
                                      "coordinator.enabled=false") from None
            log.info("coordinator: %s on rank 0 (%s:%d), verdicts within %gs", "TCP side channel",
                     socket.gethostname() if self.rank == 0 else address[0], address[1], self.co.timeout_s)
        self.client = CoordinatorClient(link, self.co.timeout_s, self.co.queue_frames)
        self.client.on_verdict = self._record_verdict
        if transport == "mpi":
            log.info("coordinator: mpi4py on rank 0 (a thread), verdicts within %gs", self.co.timeout_s)

    # ------------------------------------------------------------------------------------------ step hooks
    def begin_step(self, step: int) -> None:
        """Before step ``step``'s first forward (1-based)."""
        self.step = step
        self.docs = []
        self.faults.before_step(step, list(self.engine.module.named_parameters()), optimizer_tensors(self.engine))

    def document(self, doc_id: int, input_ids: torch.Tensor, spans, stream) -> list:
        """A document of this step begins (``stream``: its random-stream key): returns its chunk hooks."""
        self.doc = _Doc(doc_id, input_ids, list(spans), stream)
        self.docs.append(self.doc)
        self.chunk_of = {s: i for i, (s, _) in enumerate(self.doc.spans)}
        return [self._on_chunk] if self.chunk_checks else []

    def on_chunk_kv(self, phase: str, layer: int, start: int, end: int, key, value, stored_key, stored_value):
        """KVState's observer: the chunk's K/V of one layer (rollout_dist.model.kv_state ``observe_kv``)."""
        chunk = self.chunk_of.get(start, -1)
        if self.replaying:
            self.faults.on_chunk_kv(self.step, "replay", layer, chunk, key, None)
            if chunk == self.replay_chunk and self.replay_layer in (layer, None):
                self.replay_out[(layer, "key")] = dg.Reduction(key)
                self.replay_out[(layer, "value")] = dg.Reduction(value)
            return
        if phase == "fill":
            reds = [(dg.STATE, layer, "key", dg.Reduction(key, self.k)),
                    (dg.STATE, layer, "value", dg.Reduction(value, self.k))]
            self.faults.on_chunk_kv(self.step, phase, layer, chunk, key, None)  # after the digest: at rest
        else:
            self.faults.on_chunk_kv(self.step, phase, layer, chunk, key, stored_key)  # before: in the compute
            reds = [(dg.RECOMPUTE, layer, "key", dg.Reduction(key)), (dg.RECOMPUTE, layer, "value",
                                                                      dg.Reduction(value))]
            if stored_key is not None:
                reds += [(dg.STORED, layer, "key", dg.Reduction(stored_key)),
                         (dg.STORED, layer, "value", dg.Reduction(stored_value))]
        self.pending[(phase, start)].extend(reds)

    def _on_chunk(self, event: ChunkEvent) -> None:
        phase = "fill" if event.phase == "fill" else "recompute"
        for kind, layer, what, red in self.pending.pop((phase, event.start), []):
            red.to_host()
            self.chunk_red.append((kind, self.doc.doc_id, event.chunk, layer, f"layer.{layer}.{what}", red,
                                   0 if phase == "fill" else 1))

    def _on_p2p(self, direction: str, tag: tuple, peer: int, tensor: torch.Tensor) -> None:
        """The pipeline's P2P watch: a digest of every hidden state (gradient) sent or received, named alike on
        both ends (``hidden.0->1@fill``)."""
        phase, chunk, what = tag
        if direction == "received":
            self.faults.on_receive(self.step, tag, tensor)
        src, dst = (self.rank, peer) if direction == "sent" else (peer, self.rank)
        red = dg.Reduction(tensor)
        red.to_host()
        self.chunk_red.append((dg.SENT if direction == "sent" else dg.RECEIVED, self.doc.doc_id, chunk, -1,
                               f"{what}.{src}->{dst}@{phase}", red, 0 if phase == "fill" else 1))

    def before_optimizer(self) -> None:
        """After the step's backward passes, before its optimizer step (module docstring, 3)."""
        step, t0 = self.step, time.perf_counter()
        self._hash_step_tensors(dg.PARAM_BEFORE, dg.OPTIM_BEFORE, k=0)
        if self.k and self._room_for_weight_copy():
            self.before = {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
        self._sync()
        records = self._finish_chunk_records(step) + self._finish_step_records(step)
        records += self._chunk_checks(step, records) + self._at_rest_checks(step, records) + self.findings
        self.findings = []
        self._submit(records)
        self.seconds["before_optimizer"] += time.perf_counter() - t0
        if self.submitted == step - 1 and step > 1:
            t0 = time.perf_counter()
            self._act_on(step - 1)
            self.seconds["verdict_wait"] += time.perf_counter() - t0

    def _room_for_weight_copy(self) -> bool:
        """The parameters' update top-K needs a copy of the weights across the optimizer step: taken only where
        the device has twice its size free (the optimizer step needs room too); else skipped, said once."""
        if self.device.type != "cuda":
            return True
        need = sum(p.numel() * p.element_size() for p in self.engine.module.parameters())
        free = torch.cuda.mem_get_info(self.device)[0]
        if free >= 2 * need:
            return True
        if not self._said_no_room:
            self._said_no_room = True
            log.warning("coordinator.topk=%d: %.1f GiB free on the GPU before the optimizer step, a copy of the "
                        "weights needs %.1f GiB (twice that kept free): the top-K of parameter updates is not "
                        "recorded; the hashes and every check are", self.k, free / 2**30, need / 2**30)
        return False

    def after_optimizer(self) -> None:
        step, t0 = self.step, time.perf_counter()
        self._hash_step_tensors(dg.PARAM, dg.OPTIM, k=self.k)
        self._sync()
        records = self._finish_step_records(step)
        self.before = {}
        for r in records:
            if r.kind in (dg.PARAM, dg.OPTIM):
                self.last_hash[(r.kind, r.name)] = r.hash
        records.append(self._record(dg.STEP_END, step, "", hash_alg=dg.HASH_NONE))
        self._submit(records)
        self.submitted = step
        self.seconds["after_optimizer"] += time.perf_counter() - t0

    def finish(self) -> None:
        """After the last step: its verdict (the final model is exported only if the run agreed)."""
        if self.step and self.submitted == self.step:
            self._act_on(self.step)

    # -------------------------------------------------------------------------------------------- hashing
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _hash_step_tensors(self, param_kind: int, optim_kind: int, k: int) -> None:
        for name, p in self.engine.module.named_parameters():
            red = dg.Reduction(p)
            red.to_host()
            self.step_red.append((param_kind, name, red))
            if k and name in self.before:
                upd = dg.Reduction(p.detach() - self.before[name], k)
                upd.to_host()
                self.step_red.append((dg.UPDATE, name, upd))
        for name, t in optimizer_tensors(self.engine):
            red = dg.Reduction(t)
            red.to_host()
            self.step_red.append((optim_kind, name, red))

    def _record(self, kind: int, step: int, name: str, red: dg.Reduction | None = None, *, document: int = -1,
                chunk: int = -1, layer: int = -1, phase: int = 2, hash_alg: int | None = None,
                hash_: int = 0) -> dg.Digest:
        d = dg.Digest(kind, self.rank, step, name, self.layout.dp_rank, self.layout.stage, document, chunk, layer,
                      phase, hash_, dg.HASH_NONE if hash_alg is None else hash_alg, time.monotonic_ns())
        if red is not None:
            d.hash_alg, d.hash, d.indices, d.values = red.finish()
        return d

    def _finish_step_records(self, step: int) -> list[dg.Digest]:
        out = [self._record(kind, step, name, red) for kind, name, red in self.step_red]
        self.step_red = []
        return out

    def _finish_chunk_records(self, step: int) -> list[dg.Digest]:
        out = [self._record(kind, step, name, red, document=doc, chunk=chunk, layer=layer, phase=phase)
               for kind, doc, chunk, layer, name, red, phase in self.chunk_red]
        self.chunk_red = []
        return out

    # --------------------------------------------------------------------------------------------- checks
    def _mismatch(self, step: int, where: dg.Digest, text: str) -> dg.Digest:
        log.error("mismatch on rank %d, step %d: %s", self.rank, step, text)
        return self._record(dg.MISMATCH, step, f"{where.name}: {text}", document=where.document, chunk=where.chunk,
                            layer=where.layer, phase=where.phase, hash_=where.hash)

    def _chunk_checks(self, step: int, records: list[dg.Digest]) -> list[dg.Digest]:
        """Recompute and stored copy against the fill pass, per (document, chunk, layer, tensor)."""
        fill = {(r.document, r.chunk, r.name): r for r in records if r.kind == dg.STATE}
        out = []
        for r in records:
            if r.kind not in (dg.RECOMPUTE, dg.STORED):
                continue
            expected = fill.get((r.document, r.chunk, r.name))
            if expected is None or expected.hash == r.hash:
                continue
            what = ("recomputed by the backward pass" if r.kind == dg.RECOMPUTE else
                    "held by the carried state when the backward pass reached the chunk")
            verdict = self._replay(r, expected)
            out.append(self._mismatch(step, r, f"the K/V {what} differ from what the fill pass wrote "
                                      f"({r.hash:016x} vs {expected.hash:016x}); {verdict}"))
        return out

    def _at_rest_checks(self, step: int, records: list[dg.Digest]) -> list[dg.Digest]:
        out = []
        for r in records:
            kind = {dg.PARAM_BEFORE: dg.PARAM, dg.OPTIM_BEFORE: dg.OPTIM}.get(r.kind)
            if kind is None:
                continue
            last = self.last_hash.get((kind, r.name))
            if last is not None and last != r.hash:
                what = "parameter" if kind == dg.PARAM else "optimizer tensor"
                out.append(self._mismatch(step, r, f"{what} {r.name} changed at rest since the optimizer step of "
                                          f"step {step - 1} (nothing may write it in between; {r.hash:016x} vs "
                                          f"{last:016x}): memory or a stray write corrupted it"))
        return out

    def _replay(self, bad: dg.Digest, expected: dg.Digest) -> str:
        """Re-runs the document's forward up to the suspect chunk with the same random stream and compares the
        suspect layer's K/V with the fill pass's (expected) and the bad value: transient or persistent."""
        if self.layout.pp > 1:
            return "not replayed (a pipeline stage's input came from the previous stage)"
        doc = next((d for d in self.docs if d.doc_id == bad.document), None)
        if doc is None:
            return "not replayed (document not kept)"
        adapter = CausalLMAdapter(self.engine.module)
        ids = doc.input_ids.to(adapter.device)
        state = self.rollout.new_state(self.engine.module, ids.shape[0], doc.spans[bad.chunk][1])
        state.observer = self
        self.replaying, self.replay_chunk, self.replay_layer, self.replay_out = True, bad.chunk, bad.layer, {}
        saved_chunks = self.chunk_of
        self.chunk_of = {s: i for i, (s, _) in enumerate(doc.spans)}
        try:
            with adapter.chunk_attention(), torch.no_grad():
                for c, (s, e) in enumerate(doc.spans[:bad.chunk + 1]):
                    adapter.forward_chunk(ids[:, s:e], s, state, phase="fill", kernel=self.rollout.kernel,
                                          layer_scope=lambda layer, c=c: doc.stream.scope(c, layer, adapter.device))
        finally:
            self.replaying, self.chunk_of = False, saved_chunks
            state.close()
        red = self.replay_out[(bad.layer, bad.name.rsplit(".", 1)[1])]
        red.to_host()
        self._sync()
        _, h, _, _ = red.finish()
        if h == expected.hash:
            return "transient: a replay of the chunk gives the fill pass's value again"
        if h == bad.hash:
            return "persistent: a replay of the chunk repeats the bad value"
        return f"the replay agrees with neither ({h:016x}): a non-deterministic kernel?"

    def check_resumed(self, state, chunks_done: int) -> None:
        """A document resumed from a chunk snapshot: the last chunk it holds is replayed from the loaded prefix with
        this step's weights and random stream, into the same buffers; every layer's loaded K/V must equal the
        replay's, else a ``MISMATCH`` of this step (docs/coordinator.md, Replay)."""
        if chunks_done == 0 or self.layout.pp > 1:
            return
        c, doc = chunks_done - 1, self.doc
        s, e = doc.spans[c]
        loaded = {}
        for i in range(state.num_layers):
            for kind, what in (("k", "key"), ("v", "value")):
                loaded[(state.layer_offset + i, what)] = dg.Reduction(state._layer_tensor(kind, i)[:, s:e])
        adapter = CausalLMAdapter(self.engine.module)
        state.observer = self
        self.replaying, self.replay_chunk, self.replay_layer, self.replay_out = True, c, None, {}
        try:
            with adapter.chunk_attention(), torch.no_grad():
                adapter.forward_chunk(doc.input_ids[:, s:e].to(adapter.device), s, state, phase="fill",
                                      kernel=self.rollout.kernel,
                                      layer_scope=lambda layer: doc.stream.scope(c, layer, adapter.device))
        finally:
            self.replaying = False
        for red in (*loaded.values(), *self.replay_out.values()):
            red.to_host()
        self._sync()
        bad = []
        for (layer, what), red in sorted(loaded.items()):
            h_loaded, h_replay = red.finish()[1], self.replay_out[(layer, what)].finish()[1]
            if h_loaded != h_replay:
                where = self._record(dg.MISMATCH, self.step, f"layer.{layer}.{what}", document=doc.doc_id, chunk=c,
                                     layer=layer, phase=3, hash_=h_loaded)
                bad.append(self._mismatch(self.step, where, f"the resumed chunk snapshot's K/V differ from a replay "
                                          f"of chunk {c} from its loaded prefix ({h_loaded:016x} vs {h_replay:016x})"))
        self.findings.extend(bad)
        if not bad:
            log.info("resumed chunk snapshot: chunk %d of document %d replayed from its loaded prefix; its K/V agree "
                     "in all %d tensors", c, doc.doc_id, len(loaded))

    # ------------------------------------------------------------------------------------------- verdicts
    def _submit(self, records: list[dg.Digest]) -> None:
        if self.client is None or self.lost:
            return
        try:
            self.client.submit(records)
        except CoordinatorLost:
            pass  # the client remembers; the policy acts at the next verdict, where every rank stands alike

    def _record_verdict(self, step: int, verdict: list[str]) -> None:
        with self.verdict_cond:
            self.verdicts[step] = verdict
            self.verdict_cond.notify_all()

    def _act_on(self, step: int) -> None:
        """Waits for step ``step``'s verdict and applies ``coordinator.on_mismatch``."""
        if self.client is None or self.lost:
            return
        try:
            verdict, _ = self.client.wait_batch(step)
        except CoordinatorLost as err:
            self._coordinator_lost(str(err))
            return
        if not verdict:
            self.agreed = step
            return
        policy = self.co.on_mismatch
        text = "\n".join(verdict)
        if policy == "halt":
            raise DivergenceError(f"step {step} did not agree; stopping (coordinator.on_mismatch=halt); the last "
                                  f"agreed step is {self.agreed}:\n{text}")
        if policy == "resync":
            raise Resync(self.agreed, verdict)
        for line in verdict:
            log.warning("%s (coordinator.on_mismatch=warn: carrying on)", line)

    def _coordinator_lost(self, why: str) -> None:
        with self.verdict_cond:
            self.lost = True
            self.verdict_cond.notify_all()
        if self.co.on_mismatch == "halt":
            raise DivergenceError(f"the coordinator is lost ({why}); stopping (coordinator.on_mismatch=halt) at "
                                  f"step {self.step}; the last agreed step is {self.agreed}")
        log.warning("the coordinator is lost (%s); carrying on without checks (coordinator.on_mismatch=%s)", why,
                    self.co.on_mismatch)

    def gate(self, step: int) -> bool:
        """For rank 0's snapshot writer: True once step ``step`` agreed (or, with the coordinator lost, when the
        policy carries on), False if it did not (the snapshot must not be published)."""
        deadline = time.monotonic() + self.co.timeout_s
        with self.verdict_cond:
            while step not in self.verdicts and not self.lost:
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.co.on_mismatch != "halt"
                self.verdict_cond.wait(min(left, 1.0))
            verdict = self.verdicts.get(step)
        if verdict is None:  # lost before the verdict
            return self.co.on_mismatch != "halt"
        return not verdict or self.co.on_mismatch == "warn"

    def rolled_back(self, step: int) -> None:
        """After a resync to step ``step``: forget later verdicts, tell the coordinator, re-take at-rest hashes."""
        with self.verdict_cond:
            for s in [s for s in self.verdicts if s > step]:
                del self.verdicts[s]
        if self.client is not None:
            self.client.rollback(step)
        self.attach(step)
        self.agreed, self.submitted = step, -1  # step was agreed: no verdict to wait for

    # ----------------------------------------------------------------------------------------------- log
    def _on_batch(self, step: int, batch: list[dg.Digest], verdict: list[str]) -> None:
        """The coordinator thread (rank 0): keeps the step's ordered records until a snapshot persists them
        (``digest_files``); no I/O here, so that the verdict goes out at once."""
        data = dg.pack_all(batch)
        with self.log_lock:
            self.unlogged[step] = data
            self.unlogged_bytes += len(data)
            while self.unlogged_bytes > LOG_MEMORY_BYTES and len(self.unlogged) > 1:
                oldest = min(self.unlogged)
                self.unlogged_bytes -= len(self.unlogged.pop(oldest))
                if not self._said_log_full:
                    self._said_log_full = True
                    log.warning("coordinator: more than %d MB of digests since the last snapshot; the oldest steps' "
                                "are dropped from the log (snapshot more often to keep them)", LOG_MEMORY_BYTES >> 20)

    def digest_files(self, step: int) -> list[tuple[str, bytes]]:
        """For rank 0's snapshot writer, before it publishes step ``step``: the ordered log of every step up to it
        not yet written, as (path in the store, bytes); the log is persisted with the snapshots."""
        with self.log_lock:
            steps = sorted(s for s in self.unlogged if s <= step)
            out = [(digest_log_name(s), self.unlogged.pop(s)) for s in steps]
            self.unlogged_bytes -= sum(len(d) for _, d in out)
        return out

    def _check_against_log(self, step: int, records: list[dg.Digest]) -> None:
        """A resumed run's parameters must be what the digest log holds for the step it resumes."""
        raw = self.store.loc.read(digest_log_name(step))
        if raw is None:
            log.info("no digest log for step %d in the store: the resumed state is not checked against it", step)
            return
        logged = {r.name: r for r in dg.unpack_all(raw) if r.kind == dg.PARAM and r.rank == self.rank}
        bad = [r.name for r in records if r.kind == dg.PARAM and r.name in logged
               and logged[r.name].hash_alg == r.hash_alg and logged[r.name].hash != r.hash]
        if bad:
            raise DivergenceError(f"mismatch: rank {self.rank}, step {step}: the resumed parameters differ from the "
                                  f"digests logged for step {step} ({len(bad)} tensors, first {bad[0]}): the "
                                  "snapshot does not hold the state the run verified")
        checked = sum(1 for r in records if r.kind == dg.PARAM and r.name in logged)
        log.info("resumed parameters match the digest log of step %d (%d tensors checked)", step, checked)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.hub is not None:
            self.hub.stop.set() if self.hub.stall_at is not None else None
            self.hub.join(timeout=10.0)
