"""The coordinator: collects every rank's digests, orders them, and broadcasts each step's ordered batch and verdict.

Where it runs: a thread of global rank 0 (``Hub``), never a rank of its own.  Under ``mpirun``, DeepSpeed's MPI
discovery builds the torch world from COMM_WORLD, so a dedicated coordinator rank would have to be split off
before it and would then be a process holding no GPU work beside every node's GPUs; a spawned process cannot
join COMM_WORLD without ``MPI_Comm_spawn``.  A thread shares rank 0's lifetime (if rank 0 dies the job is over
anyway) and needs no extra slot.  Transports:

* ``mpi``: under mpirun (Open MPI's rank variables), over mpi4py on a duplicate of COMM_WORLD (every rank calls
  ``Dup`` at set-up, before training), non-blocking sends and polled receives so that no thread sits in a blocking
  MPI call at exit.  mpi4py initialises MPI with ``MPI_THREAD_MULTIPLE`` (its default), which the sender and
  receiver threads need.
* ``tcp``: under deepspeed, torchrun or one process, a side channel: rank 0 listens on ``coordinator.port``
  (0: any free port) on every interface, and the address (``MASTER_ADDR`` where the launcher set it, else this
  host's name) reaches the other ranks through the process group once, at set-up.

Frames (both transports): one byte of type, then the payload.  Up: ``RECORDS`` (digest records,
rollout_dist.coordinator.digest), ``ROLLBACK`` (u64 step: this rank rolled back to that step, so its records of
later steps are void), ``BYE``.  Down: ``BATCH`` (u64 step, u32 verdict length, the verdict as UTF-8
lines, then the ordered records for this rank's checks and log), ``BYE``.  Over TCP each frame is preceded by its
length (u32).

What a batch holds: when every rank has sent ``STEP_END`` for step s, the hub sorts the step's records by
``Digest.order`` (step, document, chunk, stage, layer, rank), checks them (``check_batch``: the same function
every rank could run), appends them to the ordered log (``on_batch``: rank 0 persists it with the snapshots) and
sends every rank the verdict and the step-level records of its own stage (parameters, optimizer state, what was
sent and received between stages, mismatches).  Chunk-level records are logged, not broadcast: they are checked
on the rank that made them.
"""
from __future__ import annotations

import logging
import queue
import selectors
import socket
import struct
import threading
import time
from collections import defaultdict
from typing import Callable

from .digest import MISMATCH, OPTIM, PARAM, RECEIVED, SENT, STEP_END, Digest, pack_all, unpack_all

log = logging.getLogger("rollout_dist")

RECORDS, BYE, BATCH, ROLLBACK = 1, 2, 3, 4
BROADCAST_KINDS = (PARAM, OPTIM, SENT, RECEIVED, MISMATCH, STEP_END)
_LEN = struct.Struct("<I")
_BATCH = struct.Struct("<QI")
TAG_UP, TAG_DOWN = 7101, 7102


class CoordinatorLost(RuntimeError):
    """The coordinator stopped answering (died, stalled past ``coordinator.timeout_s``, or its link broke)."""


# --------------------------------------------------------------------------------------------------- checks
def check_batch(records: list[Digest], zero_stage: int) -> list[str]:
    """Mismatches in one step's records: each rank's own findings (``MISMATCH``), parameters that differ between
    the data-parallel replicas of a stage (optimizer state too at ZeRO 0, where it is replicated), and hidden
    states or gradients received other than they were sent.  One line per finding; empty: the step agrees."""
    out = [f"mismatch: {r.name} ({r.where().rsplit(', tensor', 1)[0]})" for r in records if r.kind == MISMATCH]
    groups: dict[tuple, dict[int, Digest]] = defaultdict(dict)
    for r in records:
        if r.kind == PARAM or (r.kind == OPTIM and zero_stage == 0):
            groups[(r.kind, r.stage, r.name)][r.rank] = r
    for (kind, stage, name), by_rank in sorted(groups.items()):
        hashes = defaultdict(list)
        for rank, r in sorted(by_rank.items()):
            hashes[r.hash].append(rank)
        if len(hashes) > 1:
            majority = max(hashes.values(), key=len)
            odd = [rank for h, ranks in hashes.items() if ranks is not majority for rank in ranks]
            step = next(iter(by_rank.values())).step
            what = "parameter" if kind == PARAM else "optimizer tensor"
            suspects = ", ".join(f"rank {x}" for x in odd) if len(majority) > len(odd) else (
                "ranks " + " and ".join(str(x) for x in sorted(by_rank)))
            out.append(f"mismatch: {what} {name} differs across the data-parallel replicas of stage {stage} after "
                       f"step {step} ({suspects}; hashes " + ", ".join(
                           f"rank {rk}: {r.hash:016x}" for rk, r in sorted(by_rank.items())) + ")")
    sent = {(r.document, r.chunk, r.phase, r.name): r for r in records if r.kind == SENT}
    for r in records:
        if r.kind == RECEIVED:
            s = sent.get((r.document, r.chunk, r.phase, r.name))
            if s is not None and s.hash != r.hash:
                out.append(f"mismatch: {r.name} received by rank {r.rank} (stage {r.stage}) differs from what rank "
                           f"{s.rank} (stage {s.stage}) sent: step {r.step}, document {r.document}, chunk "
                           f"{r.chunk}, tensor {r.name}")
    return out


class Coordinator:
    """Collects records until every rank has ended a step, then gives that step's batch, ordered."""

    def __init__(self, world: int):
        self.world = world
        self.pending: dict[int, list[Digest]] = defaultdict(list)
        self.ended: dict[int, set[int]] = defaultdict(set)

    def rollback(self, rank: int, step: int) -> None:
        """``rank`` went back to ``step``: what it sent about later steps is void (it will send them again)."""
        for s in [s for s in self.pending if s > step]:
            self.pending[s] = [r for r in self.pending[s] if r.rank != rank]
            self.ended[s].discard(rank)

    def add(self, records: list[Digest]) -> list[tuple[int, list[Digest]]]:
        done = []
        for r in records:
            self.pending[r.step].append(r)
            if r.kind == STEP_END:
                self.ended[r.step].add(r.rank)
                if len(self.ended[r.step]) == self.world:
                    del self.ended[r.step]
                    done.append((r.step, sorted(self.pending.pop(r.step), key=lambda d: d.order)))
        return done


def batch_frame(step: int, verdict: list[str], records: list[Digest]) -> bytes:
    text = "\n".join(verdict).encode("utf-8")
    return bytes([BATCH]) + _BATCH.pack(step, len(text)) + text + pack_all(records)


def parse_batch(frame: bytes) -> tuple[int, list[str], list[Digest]]:
    step, n = _BATCH.unpack_from(frame, 1)
    p = 1 + _BATCH.size
    text = frame[p:p + n].decode("utf-8")
    return step, [line for line in text.split("\n") if line], unpack_all(memoryview(frame)[p + n:])


# ----------------------------------------------------------------------------------------------- transports
class _TcpConn:
    """Length-prefixed frames over one socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(_LEN.pack(len(frame)) + frame)

    def frames(self) -> list[bytes]:
        """Reads what is there (the socket is readable); raises ConnectionError at end of stream."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        self.buf += data
        out = []
        while len(self.buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < _LEN.size + n:
                break
            out.append(bytes(self.buf[_LEN.size:_LEN.size + n]))
            del self.buf[:_LEN.size + n]
        return out


class TcpHubLink:
    def __init__(self, port: int = 0):
        self.server = socket.create_server(("", port), reuse_port=False)
        self.server.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ)
        self.conns: dict[int, _TcpConn] = {}  # rank -> connection (known from its first frame)

    @property
    def port(self) -> int:
        return self.server.getsockname()[1]

    def poll(self, timeout: float) -> list[tuple[int, bytes]]:
        out = []
        for key, _ in self.sel.select(timeout):
            if key.fileobj is self.server:
                sock, _ = self.server.accept()
                sock.setblocking(True)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sel.register(sock, selectors.EVENT_READ, _TcpConn(sock))
                continue
            conn: _TcpConn = key.data
            try:
                frames = conn.frames()
            except (ConnectionError, OSError):
                self.sel.unregister(conn.sock)
                conn.sock.close()
                continue
            for f in frames:
                rank = struct.unpack_from("<i", f, 1)[0]
                self.conns[rank] = conn
                out.append((rank, f[:1] + f[5:]))
        return out

    def send(self, rank: int, frame: bytes) -> None:
        conn = self.conns.get(rank)
        if conn is not None:
            try:
                conn.send(frame)
            except OSError:
                pass  # that rank is gone; the others still get theirs

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


class TcpRankLink:
    def __init__(self, address: tuple[str, int], rank: int, timeout: float):
        self.rank = rank
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = _TcpConn(self.sock)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.send_lock = threading.Lock()

    def send(self, frame: bytes) -> None:
        with self.send_lock:  # the rank's id after the type byte: the hub learns who is on this socket
            self.conn.send(frame[:1] + struct.pack("<i", self.rank) + frame[1:])

    def poll(self, timeout: float) -> list[bytes]:
        return self.conn.frames() if self.sel.select(timeout) else []

    def close(self) -> None:
        self.sel.close()
        self.sock.close()


class MpiHubLink:
    def __init__(self, comm):
        from mpi4py import MPI
        self.comm, self.MPI, self.requests = comm, MPI, []

    def poll(self, timeout: float) -> list[tuple[int, bytes]]:
        status, out, deadline = self.MPI.Status(), [], time.monotonic() + timeout
        while True:
            while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=TAG_UP, status=status):
                src = status.Get_source()
                out.append((src, self.comm.recv(source=src, tag=TAG_UP)))
            self.requests = [r for r in self.requests if not r.Test()]
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.0005)

    def send(self, rank: int, frame: bytes) -> None:
        self.requests.append(self.comm.isend(frame, dest=rank, tag=TAG_DOWN))

    def close(self) -> None:
        for r in self.requests:
            if not r.Test():
                r.Cancel()


class MpiRankLink:
    def __init__(self, comm):
        from mpi4py import MPI
        self.comm, self.MPI, self.requests = comm, MPI, []

    def send(self, frame: bytes) -> None:
        self.requests = [r for r in self.requests if not r.Test()]
        self.requests.append(self.comm.isend(frame, dest=0, tag=TAG_UP))

    def poll(self, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            if self.comm.Iprobe(source=0, tag=TAG_DOWN):
                return [self.comm.recv(source=0, tag=TAG_DOWN)]
            if time.monotonic() >= deadline:
                return []
            time.sleep(0.0005)

    def close(self) -> None:
        deadline = time.monotonic() + 5.0
        while self.requests and time.monotonic() < deadline:
            self.requests = [r for r in self.requests if not r.Test()]
            time.sleep(0.001)


# ------------------------------------------------------------------------------------------------------ hub
class Hub(threading.Thread):
    """The coordinator thread (global rank 0): receives frames, orders them into batches, checks and broadcasts
    them.  ``stall_at``/``kill_at`` (fault injection): at that step's batch it stops answering while keeping its
    links open, or closes them and ends."""

    def __init__(self, link, world: int, stages: dict[int, int], zero_stage: int,
                 on_batch: Callable[[int, list[Digest], list[str]], None] | None = None,
                 stall_at: int | None = None, kill_at: int | None = None):
        super().__init__(name="rollout_dist-coordinator", daemon=True)
        self.link, self.world, self.stages, self.zero_stage = link, world, stages, zero_stage
        self.core = Coordinator(world)
        self.on_batch, self.stall_at, self.kill_at = on_batch, stall_at, kill_at
        self.stop = threading.Event()
        self.byes: set[int] = set()
        self.error: BaseException | None = None
        self.bytes_in = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set() and len(self.byes) < self.world:
                for rank, frame in self.link.poll(0.05):
                    self.bytes_in += len(frame)
                    if frame[0] == BYE:
                        self.byes.add(rank)
                        continue
                    if frame[0] == ROLLBACK:
                        self.core.rollback(rank, struct.unpack_from("<Q", frame, 1)[0])
                        continue
                    for step, batch in self.core.add(unpack_all(memoryview(frame)[1:])):
                        if not self._broadcast(step, batch):
                            return
        except BaseException as err:  # noqa: BLE001 - reported to the training thread, which decides
            self.error = err
            log.error("coordinator stopped: %s", err)
        finally:
            if self.stop.is_set() or len(self.byes) >= self.world:
                for rank in range(self.world):
                    self.link.send(rank, bytes([BYE]))
            self.link.close()

    def _broadcast(self, step: int, batch: list[Digest]) -> bool:
        if self.kill_at is not None and step >= self.kill_at:
            log.warning("coordinator: fault injection kills the coordinator at step %d", step)
            return False
        if self.stall_at is not None and step >= self.stall_at:
            log.warning("coordinator: fault injection stalls the coordinator at step %d", step)
            self.stop.wait()
            return False
        verdict = check_batch(batch, self.zero_stage)
        if self.on_batch is not None:
            self.on_batch(step, batch, verdict)
        for rank in range(self.world):
            stage = self.stages.get(rank, 0)
            mine = [r for r in batch if r.kind in BROADCAST_KINDS and (r.kind not in (PARAM, OPTIM)
                                                                       or r.stage == stage)]
            self.link.send(rank, batch_frame(step, verdict, mine))
        return True


# --------------------------------------------------------------------------------------------------- client
class CoordinatorClient:
    """A rank's end: ``submit`` queues records (a background thread sends them), ``wait_batch`` returns a step's
    verdict and records once the coordinator has broadcast them, or raises ``CoordinatorLost`` after
    ``timeout_s``.  The queue is bounded (``queue_frames``): a coordinator that stops reading fills it, and
    ``submit`` then waits at most ``timeout_s`` before raising ``CoordinatorLost``, so training never hangs."""

    def __init__(self, link, timeout_s: float, queue_frames: int = 256):
        self.link, self.timeout_s = link, timeout_s
        self.outbox: queue.Queue = queue.Queue(maxsize=queue_frames)
        self.batches: dict[int, tuple[list[str], list[Digest]]] = {}
        self.cond = threading.Condition()
        self.lost: str | None = None
        self.on_verdict: Callable[[int, list[str]], None] | None = None
        """Called (on the receiving thread) with each step's verdict as it arrives."""
        self.bytes_sent = 0
        self.closed = False
        self.sender = threading.Thread(target=self._send_loop, name="rollout_dist-digests-out", daemon=True)
        self.receiver = threading.Thread(target=self._recv_loop, name="rollout_dist-digests-in", daemon=True)
        self.sender.start()
        self.receiver.start()

    def submit(self, records: list[Digest]) -> None:
        if self.lost is not None:
            raise CoordinatorLost(self.lost)
        frame = bytes([RECORDS]) + pack_all(records)
        try:
            self.outbox.put(frame, timeout=self.timeout_s)
        except queue.Full:
            self._lose(f"the coordinator read nothing for {self.timeout_s:g} s (its queue of "
                       f"{self.outbox.maxsize} frames is full)")
            raise CoordinatorLost(self.lost) from None

    def wait_batch(self, step: int, timeout_s: float | None = None) -> tuple[list[str], list[Digest]]:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self.cond:
            while step not in self.batches:
                if self.lost is not None:
                    raise CoordinatorLost(self.lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.lost = (f"no verdict on step {step} within coordinator.timeout_s={self.timeout_s:g} s "
                                 "(the coordinator stalled or died)")
                    raise CoordinatorLost(self.lost)
                self.cond.wait(min(left, 1.0))
            return self.batches.pop(step)

    def rollback(self, step: int) -> None:
        """This rank went back to ``step``: batches of later steps are dropped here and at the coordinator."""
        with self.cond:
            for s in [s for s in self.batches if s > step]:
                del self.batches[s]
        try:
            self.outbox.put(bytes([ROLLBACK]) + struct.pack("<Q", step), timeout=self.timeout_s)
        except queue.Full:
            self._lose("the coordinator read nothing while this rank rolled back")

    def _lose(self, why: str) -> None:
        with self.cond:
            if self.lost is None:
                self.lost = why
            self.cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            frame = self.outbox.get()
            if frame is None:
                return
            try:
                self.link.send(frame)
                self.bytes_sent += len(frame)
            except OSError as err:
                self._lose(f"the link to the coordinator broke ({err})")
                return

    def _recv_loop(self) -> None:
        try:
            while not self.closed:
                for frame in self.link.poll(0.05):
                    if frame[0] == BYE:
                        self._lose("the coordinator ended")
                        return
                    step, verdict, records = parse_batch(frame)
                    if self.on_verdict is not None:
                        self.on_verdict(step, verdict)
                    with self.cond:
                        self.batches[step] = (verdict, records)
                        self.cond.notify_all()
        except (ConnectionError, OSError) as err:
            if not self.closed:
                self._lose(f"the link to the coordinator broke ({err or 'closed'})")

    def close(self) -> None:
        """Says goodbye (the hub ends once every rank has) and stops the threads."""
        if self.lost is None:
            try:
                self.outbox.put(bytes([BYE]), timeout=1.0)
            except queue.Full:
                pass
        try:
            self.outbox.put(None, timeout=1.0)
        except queue.Full:
            pass
        self.sender.join(timeout=5.0)
        self.closed = True
        self.receiver.join(timeout=5.0)
        self.link.close()

