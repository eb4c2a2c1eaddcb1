"""The entry points' command line: Hydra's and OmegaConf's errors about it end in one line naming the key, exit 2.

``run_main`` runs a ``@hydra.main`` function (launch/train.py, launch/plan.py); the schema checks themselves are
in rollout_dist/config.py.  This module does not import torch.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .config import KEYS_DOC, omegaconf_message, override_text, unknown_key, unknown_key_message, value_kind


def _override(key: str, argv: list[str]) -> tuple[str, str | None]:
    """The override of ``argv`` that sets ``key`` or a key below it: (its key, its value as written); (key, None)
    if there is none."""
    for arg in argv:
        name, eq, value = arg.lstrip("+~").partition("=")
        if eq and (name == key or name.startswith(key + ".")):
            return name, value
    return key, None


def _one_line(text: object) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def command_line_error(err: Exception, argv: list[str]) -> str | None:
    """The one-line message for Hydra's or OmegaConf's error about the command line or the config (an unknown
    key, a value of the wrong type, a config group option that does not exist, an override that does not
    parse); None for an error of another kind.  ``argv``: the overrides, for the values as written."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return (f"{group}={option}: no config {err.missing_cfg_file!r} in hydra_conf/; the options of {group} are "
                f"{', '.join(err.options)}")
    if isinstance(err, OverrideParseException):
        return (f"{err.override}: not a valid override ({_one_line(err).split(' See ')[0]}); write key=value, "
                "quoting values with spaces or brackets, e.g. 'trainer.betas=[0.9,0.95]'")
    if isinstance(err, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException):
        key = cause.full_key or ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and unknown_key(key) is not None:
            return unknown_key_message(*_override(key, argv))
        if isinstance(cause, ValidationError) and value_kind(key) is not None:
            value = _override(key, argv)[1]
            value = override_text(cause.value) if value is None else value
            return f"{key}={value}: {key} takes {value_kind(key)}, not {value!r}; {KEYS_DOC}"
        return f"{_one_line(err)}: {omegaconf_message(cause)}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        message = _one_line(err)
        if isinstance(cause, OmegaConfBaseException):
            message += f": {omegaconf_message(cause)}"
        return message
    return None


def run_main(task: Callable[[], None]) -> None:
    """Runs a ``@hydra.main`` function (``task``, called without arguments as Hydra's entries are).  Hydra's and
    OmegaConf's errors about the command line or the config (the task reports its own) are logged as one line on
    logger ``rollout_dist`` and end the process with exit status 2, as a ``ConfigError`` in the task does;
    ``--help``, ``--cfg job`` and the like work as Hydra has them.  Unset, HYDRA_FULL_ERROR makes Hydra print
    several lines and exit 1 itself; set, it lets the error through to here.  A user who sets it gets Hydra's
    full error, as Hydra documents."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    argv = sys.argv[1:]
    try:
        task()
    except (HydraException, OmegaConfBaseException) as err:
        message = command_line_error(err, argv)
        if message is None or full_error:
            raise
        logging.getLogger("rollout_dist").error("%s", message)
        sys.exit(2)
