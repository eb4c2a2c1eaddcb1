"""The one object that knows ranks: data-parallel x pipeline-parallel layout and its process groups.

Ranks are laid out pipeline-fastest: ``rank = dp_rank * pp + stage``, so the stages of one pipeline are
consecutive ranks (one node's NVLink-connected GPUs under the usual launcher numbering) and replicas of a stage
are ``pp`` ranks apart.  It also serves DeepSpeed as its ``mpu``: DeepSpeed reduces gradients over the
data-parallel group and sums gradient norms over the "model-parallel" group, which here is the pipeline.
"""
from __future__ import annotations

import torch.distributed as dist


class RankLayout:
    def __init__(self, pp: int = 1, dp: int | None = None, *, rank: int | None = None, world: int | None = None):
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world is None else world
        if pp < 1 or self.world % pp:
            raise ValueError(f"parallel.pp={pp} must divide the number of processes ({self.world}); launch "
                             f"pp x dp processes, e.g. deepspeed --num_gpus {pp * max(1, self.world // pp)}")
        self.pp = pp
        self.dp = self.world // pp if dp is None else dp
        if self.dp * self.pp != self.world:
            raise ValueError(f"parallel.dp x parallel.pp = {self.dp} x {self.pp} = {self.dp * self.pp}, but "
                             f"{self.world} processes were launched; make them equal")
        self.stage = self.rank % pp
        self.dp_rank = self.rank // pp
        self._pipe_groups, self._dp_groups = {}, {}

    def build_groups(self) -> "RankLayout":
        """Creates every pipeline and data-parallel group (collective: all ranks call it in the same order)."""
        for d in range(self.dp):
            self._pipe_groups[d] = dist.new_group(self.pipeline_ranks(d))
        for s in range(self.pp):
            self._dp_groups[s] = dist.new_group(self.data_parallel_ranks(s))
        return self

    def pipeline_ranks(self, dp_rank: int | None = None) -> list[int]:
        d = self.dp_rank if dp_rank is None else dp_rank
        return [d * self.pp + s for s in range(self.pp)]

    def data_parallel_ranks(self, stage: int | None = None) -> list[int]:
        s = self.stage if stage is None else stage
        return [d * self.pp + s for d in range(self.dp)]

    @property
    def prev_rank(self) -> int | None:
        return self.rank - 1 if self.stage > 0 else None

    @property
    def next_rank(self) -> int | None:
        return self.rank + 1 if self.stage < self.pp - 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp - 1

    def __repr__(self) -> str:
        return (f"RankLayout(rank={self.rank}, world={self.world}, pp={self.pp}, dp={self.dp}, "
                f"stage={self.stage}, dp_rank={self.dp_rank})")

    # ---- DeepSpeed mpu protocol -------------------------------------------------------------------------
    def get_data_parallel_group(self):
        return self._dp_groups[self.stage]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.data_parallel_ranks()

    def get_model_parallel_group(self):
        return self._pipe_groups[self.dp_rank]

    def get_model_parallel_rank(self) -> int:
        return self.stage

    def get_model_parallel_world_size(self) -> int:
        return self.pp

    pipeline_group = get_model_parallel_group
    data_parallel_group = get_data_parallel_group
