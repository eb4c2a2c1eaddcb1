"""Metrics sinks: metrics.jsonl (one line per step, continued without duplicates on resume), train.log (the step
lines), the console's step lines; and the sinks as a real run opens them."""
import json
import logging
import shutil
from dataclasses import asdict, fields

import pytest

from rollout_dist.train.metrics import ConsoleSink, JsonlSink, StepStats, TrainLog, step_line
from tests.test_trainer import make_trainer


def stats(step, loss=None, grad_norm=0.5):
    return StepStats(step=step, loss=3.0 - 0.25 * step if loss is None else loss, tokens=100 * step, chunks=step + 1,
                     seconds=0.5, tokens_per_s=200.0 * step, peak_mem_gib=1.25, lr=1e-3, grad_norm=grad_norm)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_object_per_step_with_every_field(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl", start_step=0)
    written = [stats(1), stats(2, grad_norm=None), stats(3)]
    for s in written:
        sink.on_step(s)
        # flushed at every step: a reader (or a killed run) sees it at once
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == s.step
    sink.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [asdict(s) for s in written]
    assert set(records[0]) == {f.name for f in fields(StepStats)}
    assert records[1]["grad_norm"] is None and records[2]["loss"] == 2.25


def test_jsonl_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlSink(path, start_step=0)
    for step in range(1, 5):
        first.on_step(stats(step))
    first.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "loss"')  # killed while writing step 5
    resumed = JsonlSink(path, start_step=2)  # the checkpoint it resumes from is step 2's
    for step in (3, 4, 5):
        resumed.on_step(stats(step, loss=9.0 + step))
    resumed.close()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [2.75, 2.5, 12.0, 13.0, 14.0]  # 3 and 4 are the resumed run's


def test_train_log_has_the_step_lines_and_the_run_log(tmp_path):
    path = tmp_path / "train.log"
    sink = TrainLog(path, log_every=2)
    try:
        logging.getLogger("rollout_dist").warning("a set-up warning")
        for step in range(1, 5):
            sink.on_step(stats(step))
    finally:
        sink.close()
    text = path.read_text()
    assert "a set-up warning" in text
    for step in (1, 2, 4):  # the first, then every log_every-th, as on the console
        assert step_line(stats(step)) in text
    assert "step     3" not in text
    logging.getLogger("rollout_dist").warning("after close")
    assert "after close" not in path.read_text()  # the handler is gone from the root logger


def test_console_writes_the_step_lines(capsys):
    sink = ConsoleSink(max_steps=3, start_step=0, log_every=10)
    for step in (1, 2, 3):
        sink.on_step(stats(step))
    sink.close()
    captured = capsys.readouterr()
    out = captured.out  # the lines on stdout (tqdm.write), the bar on stderr
    assert "step     1  loss 2.7500  tokens      100  chunks    2" in out and "grad_norm 0.5" in out
    assert "step     2  loss" not in out and "step     3  loss" not in out  # the first, then every 10th
    assert "3/3" in captured.err


def test_a_run_writes_metrics_jsonl_and_train_log(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, log_every=2)
    history = trainer.fit()
    run = tmp_path / "run"
    assert read_jsonl(run / "metrics.jsonl") == [asdict(s) for s in history]
    log_text = (run / "train.log").read_text()
    assert step_line(history[0]) in log_text and step_line(history[1]) in log_text
    assert f"step {3:>5}  loss" not in log_text


def test_a_resumed_run_continues_metrics_jsonl(tmp_path):
    """A run killed after step 3's metrics but before step 3's checkpoint: the resumed run redoes step 3, and
    metrics.jsonl ends with each step once."""
    make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=2).fit()
    shutil.rmtree(tmp_path / "run" / "state.zarr" / "v000003")
    before = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    history = make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=2, resume=True).fit()
    after = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[:2] == before[:2] and after[2] == asdict(history[2])
    assert after[2]["loss"] == pytest.approx(before[2]["loss"], rel=1e-6)  # the redone step is the same step


@pytest.fixture
def entry_logging():
    """``console_logging`` as the entry point installs it, undone afterwards (it configures the root logger)."""
    root, deepspeed_log = logging.getLogger(), logging.getLogger("DeepSpeed")
    saved = (root.handlers[:], root.level, deepspeed_log.filters[:])
    yield
    root.handlers[:], deepspeed_log.filters[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def test_log_lines_print_above_the_bar_and_deepspeed_notices_reach_train_log_only(tmp_path, capsys,
                                                                                   entry_logging):
    import io
    import warnings

    from rollout_dist.train.metrics import console_logging
    stream = io.StringIO()
    console_logging(stream=stream)
    deepspeed_log = logging.getLogger("DeepSpeed")
    # before the run directory exists (DeepSpeed warns at import): held for train.log
    deepspeed_log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                          "detect it.")
    logging.getLogger("rollout_dist.data").warning("skipping a.txt: 1 token(s)")
    sink = TrainLog(tmp_path / "train.log", log_every=1)
    try:
        bar = ConsoleSink(max_steps=2, start_step=0, log_every=1)
        bar.bar.fp = stream  # the bar on the same stream as the log lines, as on a terminal
        bar.on_step(stats(1))
        deepspeed_log.warning("total_num_steps 2 is less than warmup_num_steps 4")
        deepspeed_log.warning("a DeepSpeed warning that matters")
        logging.getLogger("rollout_dist").info("snapshot v000001 committed")
        warnings.warn("a deprecation", FutureWarning)
        bar.on_step(stats(2))
        bar.close()
    finally:
        sink.close()
    console = stream.getvalue()
    lines = [seg for line in console.split("\n") for seg in line.split("\r") if seg.strip()]
    assert any(seg.endswith("INFO rollout_dist: snapshot v000001 committed")
               and seg.startswith("20") for seg in lines), lines  # a line of its own, not after the bar
    assert "WARNING DeepSpeed: a DeepSpeed warning that matters" in console
    assert "skipping a.txt" in console and "FutureWarning: a deprecation" in console
    assert "Setting accelerator" not in console and "warmup_num_steps" not in console
    assert "Setting accelerator" not in capsys.readouterr().out  # nor by DeepSpeed's own handler on stdout
    log_text = (tmp_path / "train.log").read_text()
    for line in ("WARNING DeepSpeed: Setting accelerator to CPU", "WARNING rollout_dist.data: skipping a.txt",
                 "WARNING DeepSpeed: total_num_steps 2 is less than warmup_num_steps 4", "snapshot v000001 committed",
                 "FutureWarning: a deprecation"):
        assert line in log_text, line
    assert log_text.index("Setting accelerator") < log_text.index("skipping a.txt") < log_text.index("snapshot v000001")
