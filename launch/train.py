"""Training entry point: ``deepspeed launch/train.py [hydra overrides]`` or ``python launch/train.py ...``.

Hydra composes hydra_conf/ (see rollout_dist/config.py for every key); errors in the command line, the config,
the model or the data are reported in one line naming the key or file, with exit status 2, before anything is
written.  A snapshot that cannot be written exits 1; a step the coordinator's checks found not to agree (under
``coordinator.on_mismatch=halt``) exits 3, every rank at the same step, with no snapshot of a later step published.
Log lines print above the progress bar, on stderr; train.log in the run directory has them all.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from rollout_dist.checkpoint.store import SnapshotError  # noqa: E402
from rollout_dist.cli import run_main  # noqa: E402
from rollout_dist.config import ConfigError, to_train_config  # noqa: E402
from rollout_dist.data import DataError  # noqa: E402
from rollout_dist.train.metrics import console_logging  # noqa: E402


def _strip_launcher_args() -> None:
    """The deepspeed launcher appends --local_rank=N; Hydra accepts only overrides, so move it to the env."""
    kept = []
    for arg in sys.argv[1:]:
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else None
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        kept.append(arg)
    sys.argv[1:] = kept


@hydra.main(config_path="../hydra_conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rollout_dist.trainer import DivergenceError, Trainer
    try:
        train_cfg = to_train_config(cfg)
        trainer = Trainer(train_cfg, resolved_config=OmegaConf.to_yaml(cfg, resolve=True))
        trainer.fit()
    except (ConfigError, DataError, NotImplementedError) as err:
        # construction checks every input before anything is written; set-up (process group, layout, resume)
        # raises the same errors for what only a started run can know
        logging.getLogger("rollout_dist").error("%s", err)
        sys.exit(2)
    except SnapshotError:  # a snapshot could not be written (full disk, permissions): logged by the trainer
        sys.exit(1)
    except DivergenceError:  # logged by the trainer; every rank stops here
        trainer.close()
        sys.exit(3)
    trainer.close()


if __name__ == "__main__":
    _strip_launcher_args()
    console_logging()
    run_main(main)
