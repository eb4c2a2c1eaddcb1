"""Chunk planning with the training config: ``python launch/plan.py [the same overrides as training]``.

Writes the chunk index named by ``data.chunk_index`` for the documents of ``data.path``, with the profile of the
``planner`` group, the tokenizer of ``model.path`` (the built-in byte tokenizer without one) and the mode of
``rollout.mode``; the training command given the same overrides then reads it:

    python launch/plan.py  data.path='contracts/*.txt' data.chunk_index=plans/contracts planner=legal
    deepspeed launch/train.py data.path='contracts/*.txt' data.chunk_index=plans/contracts planner=legal ...
"""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rollout_dist.cli import run_main  # noqa: E402
from rollout_dist.config import ConfigError, to_train_config  # noqa: E402
from rollout_dist.data import DataError  # noqa: E402


class _Format(logging.Formatter):
    """Progress lines as they are; a warning or an error with its level and logger, as training prints them."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname} {record.name}: {message}"


@hydra.main(config_path="../hydra_conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rollout_dist.plan import format_summary, plan_corpus
    from rollout_dist.planning.index import ChunkIndexError
    from rollout_dist.planning.planner import PlanError
    from rollout_dist.planning.tokens import TokenizerError
    try:
        c = to_train_config(cfg)
        if c.data.chunk_index is None:
            raise ConfigError("data.chunk_index names the store to write; e.g. data.chunk_index=plans/corpus")
        _, summary = plan_corpus(c.data.path, c.data.chunk_index, c.planner, tokenizer=c.model.path or "byte",
                                 mode=c.rollout.mode, text_field=c.data.text_field, invalid_utf8=c.data.invalid_utf8)
    except (ConfigError, DataError, TokenizerError, PlanError, ChunkIndexError) as err:
        logging.getLogger("rollout_dist").error("%s", err)
        sys.exit(2)
    print(format_summary(summary))


if __name__ == "__main__":
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_Format())
    logging.basicConfig(level=logging.INFO, handlers=[console])
    run_main(main)
