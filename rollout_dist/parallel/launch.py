"""Joining the process group the launcher set up (deepspeed, torchrun, Open MPI) and picking this rank's device."""
from __future__ import annotations

import os

import torch

from ..config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def local_rank() -> int:
    """This process's index on its node, from the deepspeed/torchrun launcher or Open MPI."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))


_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_launched_by_mpi = False


def launched_by_mpi() -> bool:
    """Whether ``init_distributed`` found an MPI launch (mpirun; its ranks discovered through mpi4py)."""
    return _launched_by_mpi


def init_distributed(device: torch.device) -> None:
    """Joins the process group that ``deepspeed``/``torchrun`` set up (RANK etc. in the environment), discovers
    ranks through mpi4py under ``deepspeed --launcher openmpi``/``mpirun``, or makes a one-process group."""
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _skip_shm_op()
    backend = "nccl" if device.type == "cuda" else "gloo"
    global _launched_by_mpi
    if "RANK" not in os.environ and any(v in os.environ for v in _MPI_RANK_VARS):
        _launched_by_mpi = True
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True)
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _skip_shm_op() -> None:
    """Keeps DeepSpeed's CPU accelerator from building and loading its shared-memory all-reduce op when a CPU
    process joins the group.  Only DeepSpeed's inference all-reduce uses that op (training's collectives go through
    gloo), yet every process loads it, and the first one on a machine compiles it (a minute of C++, again whenever
    another checkout or venv rebuilt the shared torch-extensions cache).  DeepSpeed builds it only where its table of
    compatible ops (``deepspeed.ops.__compatible_ops__``, probed once per process and kept) says it can; marked not
    compatible, it is left out and the inference all-reduce falls back to torch.distributed."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
