"""The trainer's chunk snapshots (``checkpoint.chunk_every``): inside a long document, the carried K/V after every
N-th chunk of the fill pass, appended to the store in the background (rollout_dist.checkpoint.chunks), and the
resume of a document from its last one.

What resumes where (docs/checkpoints.md): exact mode, one pipeline stage; the first document of an accumulation
window (later documents would need the window's partial gradients), of a step whose starting weights are a
snapshot version (``checkpoint.every=1``, or the version the run resumed from).  A kill inside that document's fill
or backward pass resumes at its last chunk snapshot: the fill continues from there and the backward pass runs
whole, with the same random streams, so the step equals an uninterrupted one bit for bit (CPU).
"""
from __future__ import annotations

import logging

import torch

from ..checkpoint.chunks import ChunkSnapshots
from ..checkpoint.store import CorruptSnapshot, SnapshotStore
from ..checkpoint.writer import BackgroundWriter
from ..engine.rollout import ChunkEvent, ChunkHook, Rollout
from ..model.carried_state import CarriedState

log = logging.getLogger("rollout_dist")


class ChunkSnapshotter:
    """Chunk snapshots of this rank's documents; ``document`` gives the state and hook a document runs with."""

    def __init__(self, every: int, store: SnapshotStore, rank: int, background: bool = True):
        self.every = every
        self.snaps = ChunkSnapshots(store, rank)
        self.writer = BackgroundWriter("chunk-snapshot-writer", background)
        self.resumes: list[tuple[int, int]] = []  # (step index, chunks done) of each document resumed

    def document(self, rollout: Rollout, model: torch.nn.Module, *, step: int, base_version: int | None,
                 first_in_window: bool, length: int, stream, spans) -> tuple[CarriedState | None, list[ChunkHook]]:
        """(state, hooks) for a document run at step index ``step``; (None, []) where it gets no snapshots."""
        if not self.every or not first_in_window or base_version != step:
            return None, []
        key = (stream.seed, stream.step, stream.document)
        state = rollout.new_state(model, 1, length)
        body = self.snaps.find(step, base_version, key, spans)
        if body is not None:
            try:
                state.load_state_dict(self.snaps.load(body))
                self.snaps.continue_from(body)
                done = int(body["state"]["chunks"])
                self.resumes.append((step, done))
                log.info("resuming the document of step %d at its chunk snapshot after %d of %d chunks (%d tokens)",
                         step + 1, done, len(spans), int(body["state"]["position"]))
            except (CorruptSnapshot, ValueError) as err:
                log.error("chunk snapshot of step %d not used: %s; the document runs from its start", step + 1, err)
                state.close()
                state = rollout.new_state(model, 1, length)
                body = None
        if body is None:
            self.snaps.begin(step, base_version, key, spans)

        def hook(event: ChunkEvent) -> None:
            if event.phase == "fill" and (event.chunk + 1) % self.every == 0:
                captured = self.snaps.capture(event.state)
                self.writer.submit(lambda: self.snaps.write(captured))
        return state, [hook]

    def finish(self, state: CarriedState | None) -> None:
        """After the document: the last append is durable (its error raised here), the state closed."""
        if state is not None:
            state.close()
        self.writer.wait()
