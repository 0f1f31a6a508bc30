"""What every command-line entry point shares: config arguments and the exit-2 rule.

A bad config, data file or checkpoint raises ``InputError``; ``exits_on_input_error``
turns it into one line on stderr and exit code 2. Launchers call ``load_run_config``
before they start any process group, worker or MLflow run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from harness.config import Config, load_config
from harness.errors import USAGE_EXIT_CODE, InputError
from harness.tracking import default_tracking_uri


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=0.05 (repeatable)")


def load_run_config(args: argparse.Namespace) -> Config:
    """The validated config, with the tracking URI made absolute so workers elsewhere agree."""
    cfg = load_config(args.config, args.overrides)
    if cfg.tracking.enabled and not cfg.tracking.uri:
        cfg = cfg.replace(**{"tracking.uri": default_tracking_uri()})
    return cfg


def exits_on_input_error(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return USAGE_EXIT_CODE

    return wrapper
