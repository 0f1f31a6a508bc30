"""The ``harness`` command: tools around training runs (gradcheck; more to come).

Training itself starts from launch/ (torchrun, Ray, sweeps).
"""

from __future__ import annotations

import argparse
import sys

import torch

from harness.entrypoints import add_config_arguments, exits_on_input_error

GRADCHECK_TOLERANCE = 1e-8
GRADCHECK_MAX_SAMPLES = 64


def gradcheck(args: argparse.Namespace) -> int:
    """Hand-written gradients vs autograd in float64, per parameter, on one batch of the config's data."""
    from harness.backprop import gradient_differences
    from harness.config import load_config
    from harness.data import load_dataset
    from harness.model import build_model

    cfg = load_config(args.config, args.overrides)
    train_set = load_dataset(cfg).train
    n = min(cfg.optim.global_batch_size, GRADCHECK_MAX_SAMPLES, len(train_set))
    x, y = train_set.features[:n].double(), train_set.targets[:n]
    model = build_model(cfg).double()
    worst = 0.0
    print(f"gradcheck {cfg.name}: layers {cfg.layer_sizes}, activation {cfg.model.activation}, batch {n}, float64")
    print(f"{'parameter':<20} {'max rel diff':>14}")
    for name, rel in gradient_differences(model, x, y):
        worst = max(worst, rel)
        print(f"{name:<20} {rel:>14.3e}")
    verdict = "ok" if worst <= GRADCHECK_TOLERANCE else "FAIL"
    print(f"worst {worst:.3e} (tolerance {GRADCHECK_TOLERANCE:.0e}): {verdict}")
    return 0 if verdict == "ok" else 1


@exits_on_input_error
def main(argv=None) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("gradcheck", help="compare the hand-written backward pass with autograd")
    add_config_arguments(check)
    check.set_defaults(handler=gradcheck)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
