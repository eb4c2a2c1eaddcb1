"""This process's place in a run: its device, the process group, the rank layout, and the few collectives the
training loop needs (a smallest value, a sum, a barrier).

The device is known at construction (the model is built on it before any process group exists); the group and
the layout only once ``start`` has joined what the launcher set up.  Until then the context is one process
(rank 0 of 1), and every collective is a no-op, so the other roles can be used and tested without a group.
"""
from __future__ import annotations

import os

import torch

from ..config import ConfigError, ParallelConfig
from ..parallel import RankLayout
from ..parallel.launch import init_distributed, resolve_device


class RunContext:
    """Device, process group and ``RankLayout`` of this process (``start`` joins the group)."""

    def __init__(self, device: str):
        if device == "cpu":
            # DeepSpeed picks its accelerator at import; on a GPU host a CPU run must say so before that
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.device = resolve_device(device)
        self.rank, self.world = 0, 1
        self.layout: RankLayout | None = None

    def start(self, parallel: ParallelConfig) -> RankLayout:
        """Joins the launcher's process group (or makes a one-process one) and builds the pipeline x data
        layout's groups; a layout that does not match the launched processes is a ``ConfigError``."""
        init_distributed(self.device)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        try:
            self.layout = RankLayout(parallel.pp, parallel.dp).build_groups()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return self.layout

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory's shared files."""
        return self.rank == 0

    def smallest_over_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value``, so that all stages and replicas size memory alike."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t)

    def sum_over_ranks(self, values: torch.Tensor, group=None) -> torch.Tensor:
        """``values`` summed over the ranks of ``group`` (default: all), on this rank's device (NCCL reduces
        only device tensors); ``values`` itself on one process."""
        if self.world == 1:
            return values
        values = values.to(self.device)
        torch.distributed.all_reduce(values, group=group)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Ends the process group once every rank is done (rank 0 writes the final model last): a rank leaving
        with its group alive can abort at exit ("terminate called without an active exception", seen with
        gloo under torchrun).  For the entry point; a process that trains again keeps its group."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
