"""Settings for the whole test session and the processes its tests start."""
import os
import sys
from pathlib import Path

# DeepSpeed JIT-builds its C++ ops (cpu_adam for an offloaded bf16 optimizer) into torch's extensions cache, by
# default ~/.cache/torch_extensions/py3XX_cpu: one directory for every checkout and venv of the user, keyed by
# neither.  An op built there by another venv (another path, or another torch) is rebuilt by the next load here
# (minutes of C++ on a two-core machine), and then again by the other.  The tests keep one cache per venv, which
# the runs they launch inherit; a TORCH_EXTENSIONS_DIR set by the caller is kept.
if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# Under pytest-xdist (`make test`: one worker per core) each worker and what it launches computes on one thread:
# two workers' OpenMP threads spinning on two cores would each run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
