"""The ``harness`` command: tools around training runs (gradcheck, report, interpolate, escape, bench, capacity,
batch-size, scaling, replay, mlflow-server). Training itself starts from launch/ (torchrun, Ray, sweeps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

# Nothing imported at load time pulls in torch (harness.bench.bench, harness.core.checkpoint, harness.records.tracking
# do): `harness --help` answers without paying for torch.
from harness import signals
from harness.console import say
from harness.core.config import load_config
from harness.errors import InputError
from harness.launching.entrypoints import ArgumentParser, add_config_arguments, check_output_file, exits_on_input_error
from harness.records.mlflow_store import (Spool, check_experiment, check_tracking_server, check_tracking_uri,
                                          default_tracking_uri, open_client, replay as replay_spool)
from harness.records.tracking_server import check_port_free, serve_postgresql, serve_sqlite

BENCH_BATCH_SIZES = [32, 128, 512, 2048, 8192]
# bench --stack: stacking pays where one trial's step uses the device poorly, the small batches.
STACK_BATCH_SIZES = [32, 64, 128, 512]

GRADCHECK_TOLERANCE = 1e-8
GRADCHECK_MAX_SAMPLES = 64
CAPACITY_EPOCH_SAMPLES = 4096  # the timed epoch of harness capacity: batch 1 in seconds
URI_HELP = "default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
DEVICE_HELP = "auto: cuda where available, else cpu"


def gradcheck(args: argparse.Namespace) -> int:
    """Hand-written gradients vs autograd in float64, per parameter, on one batch of the config's data."""
    from harness.core.backprop import gradient_differences
    from harness.core.data import load_dataset
    from harness.core.model import build_model, describe_model, is_mlp

    cfg = load_config(args.config, args.overrides)
    if not is_mlp(cfg):
        say(f"gradcheck {cfg.name}: {describe_model(cfg)} trains with the autograd engine; the hand-written "
            "backward, and this check of it, is the note's MLP's (no model.factory)")
        return 0
    say(f"gradcheck {cfg.name}: this config trains with the {cfg.train.grad_engine} engine")
    train_set = load_dataset(cfg).train
    n = min(cfg.optim.global_batch_size, GRADCHECK_MAX_SAMPLES, len(train_set))
    x, y = train_set.features[:n].double(), train_set.targets[:n]
    model = build_model(cfg).double()
    worst = 0.0
    say(f"gradcheck {cfg.name}: layers {cfg.layer_sizes}, activation {cfg.model.activation}, batch {n}, float64")
    say(f"{'parameter':<20} {'max rel diff':>14}")
    for name, rel in gradient_differences(model, x, y):
        worst = max(worst, rel)
        say(f"{name:<20} {rel:>14.3e}")
    verdict = "ok" if worst <= GRADCHECK_TOLERANCE else "FAIL"
    say(f"worst {worst:.3e} (tolerance {GRADCHECK_TOLERANCE:.0e}): {verdict}")
    return 0 if verdict == "ok" else 1


def mlp_config(args: argparse.Namespace, command: str):
    """The config of a command that times or builds the note's MLP only: a factory's model is refused in one line
    (timing the MLP in its place would answer another question)."""
    cfg = load_config(args.config, args.overrides)
    if cfg.model.factory is not None:
        raise InputError(f"model.factory: {cfg.model.factory} with harness {command}, which times the note's MLP "
                         "(model.hidden_sizes) only; expected a config without model.factory")
    return cfg


def checked_uri(args: argparse.Namespace, server: bool = False) -> str:
    """``--tracking-uri`` or its default, refused now if MLflow cannot use it (with ``server``: nor reach it)."""
    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    if server:
        check_tracking_server(uri)
    return uri


def checked_device(requested: str):
    """``--device``'s device; cuda without a CUDA device is refused."""
    import torch

    from harness.core.distributed import pick_device

    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: cuda was requested but no CUDA device is available; expected cpu or auto")
    return pick_device(requested)


def report(args: argparse.Namespace) -> int:
    """Tables and plots of a finished sweep, read back from MLflow and logged to its parent run."""
    from harness.analysis.report import build_report
    from harness.core.checkpoint import check_writable_dir

    check_writable_dir(Path(args.out), "--out")
    result = build_report(checked_uri(args), args.experiment, sweep_run_id=args.sweep_run_id, out_dir=args.out,
                          interpolate=not args.no_interpolation)
    say(*result.answer, "", result.markdown_table, f"\nreport: {result.directory}",
        *[f"  {path}" for path in [result.csv_path, result.markdown_path, *result.plots]])
    return 0


def escape(args: argparse.Namespace) -> int:
    """Continue a finished sweep's smallest- and largest-batch solutions with each other's batch size."""
    from harness.core.checkpoint import check_writable_dir
    from harness.sweeps.escape import run_escape

    check_writable_dir(Path(args.out), "--out")
    run_escape(checked_uri(args), args.experiment, args.sweep_run_id, args.epochs, args.out)
    return 0


def interpolate(args: argparse.Namespace) -> int:
    """Keskar et al. (2017)'s 1-D interpolation between two runs' final weights: CSV, plot, a new MLflow run."""
    from harness.analysis.interpolation import run_interpolation

    result = run_interpolation(args.run_a, args.run_b, tracking_uri=args.tracking_uri, experiment=args.experiment,
                               alpha_min=args.alpha_min, alpha_max=args.alpha_max, points=args.points,
                               out_dir=args.out, device=args.device, eval_batch_size=args.eval_batch_size,
                               label_a=args.label_a, label_b=args.label_b, log_to_mlflow=not args.no_mlflow)
    say(f"{'alpha':>7} {'train loss':>11} {'train acc':>10} {'test loss':>10} {'test acc':>9}")
    for row in result.rows:
        say(f"{row['alpha']:>7.3f} {row['train_loss']:>11.4f} {row['train_accuracy']:>10.4f} "
            f"{row['test_loss']:>10.4f} {row['test_accuracy']:>9.4f}")
    say(f"\ninterpolation: {result.csv_path}", f"  {result.plot_path}", f"MLflow run {result.run_id or '-'}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Seconds per epoch of the harness's step against a plain DataLoader loop, in this process."""
    from harness.bench.bench import PATHS, format_table, run_benchmark, tf32_matmuls
    from harness.core.distributed import pick_device

    unknown = sorted(set(args.paths or ()) - set(PATHS))
    if unknown:
        raise InputError(f"--paths: {', '.join(unknown)} is not a path of the bench; expected some of "
                         f"{', '.join(PATHS)}")
    if args.epochs < 1:
        raise InputError(f"--epochs: expected a positive number of timed epochs, got {args.epochs}")
    if args.stack is not None and args.stack < 1:
        raise InputError(f"--stack: {args.stack}; expected a positive number of trials to stack")
    if args.profile and not args.stack:
        raise InputError(f"--profile: {args.profile} without --stack; expected --stack K (only the stack bench "
                         "profiles its epochs)")
    if args.json:
        check_output_file(args.json, "--json")
    cfg = mlp_config(args, "bench")
    device = pick_device(args.device)
    batch_sizes = args.batch_sizes or (STACK_BATCH_SIZES if args.stack else BENCH_BATCH_SIZES)
    for batch_size in batch_sizes:
        if not 0 < batch_size <= cfg.train_set_size:
            raise InputError(f"--batch-sizes: {batch_size} is outside 1..{cfg.train_set_size} (the training set)")
    if args.tf32 and device.type != "cuda":
        raise InputError(f"--tf32: the device is {device.type}; expected a CUDA device (TF32 is the tensor-core "
                         "format of NVIDIA GPUs)")
    with tf32_matmuls(args.tf32):
        if args.stack:
            from harness.bench.stack_bench import format_stack_table, run_stack_benchmark

            result = run_stack_benchmark(cfg, device, batch_sizes, args.epochs, args.stack,
                                         Path(args.profile) if args.profile else None)
        else:
            result = run_benchmark(cfg, device, batch_sizes, args.epochs, tuple(args.paths or PATHS))
    result["matmuls"] = "tf32" if args.tf32 else "fp32"
    say(format_stack_table(result) if args.stack else format_table(result))
    write_result_json(result, args.json, "the table above is the result")
    return 0


def write_result_json(result: dict, path: Optional[str], kept: str) -> None:
    """A tool's ``--json`` file (if ``path``), written after its work (its path was checked before it): a
    write that fails now is one line saying where the result still is."""
    if not path:
        return
    try:
        with open(path, "w") as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise InputError(f"--json: could not write {path} ({err.strerror}); {kept}") from None
    say(f"\nJSON: {path}")


def capacity(args: argparse.Namespace) -> int:
    """Time per step, per epoch and peak memory at batch sizes 1, 2, 4, ...: where the device stops being parallel."""
    from harness.bench.capacity import check_arguments, format_table, record, run_capacity, write_outputs
    from harness.core.checkpoint import check_writable_dir

    check_arguments(args.max_batch, args.memory_limit, args.epoch_samples)
    device = checked_device(args.device)
    cfg = load_config(args.config, args.overrides)
    check_writable_dir(Path(args.out), "--out")
    if args.json:
        check_output_file(args.json, "--json")
    if not args.no_mlflow:  # a store that would refuse the run is refused now, before the work
        uri = checked_uri(args, server=True)
        check_experiment(uri, args.experiment)
    say(f"capacity of {device.type}: {cfg.name}, batch 1, 2, 4, ... up to {args.max_batch}")
    result = run_capacity(cfg, device, args.max_batch, args.memory_limit, args.epoch_samples)
    say(format_table(result))
    files = write_outputs(result, Path(args.out) / f"capacity-{device.type}-{cfg.name}")
    say("", *[f"  {path}" for path in files])
    if not args.no_mlflow:
        say(f"MLflow run {record(uri, args.experiment, result, files, args.config)}")
    # Last: a write that fails now still leaves the measurement recorded.
    write_result_json(result, args.json, f"the measurement is kept in {files[0]}")
    return 0


def batch_size(args: argparse.Namespace) -> int:
    """Which batch size: predicted steps, samples and time to the config's target for every batch, from one short
    run's noise scale and the device's time per step."""
    from harness.bench import batch_size as finder
    from harness.core.checkpoint import check_writable_dir

    finder.check_arguments(args.batch, args.lr, args.every, args.window, args.max_steps, args.max_batch)
    device = checked_device(args.device)
    cfg = load_config(args.config, args.overrides)
    finder.check_config(cfg, args.batch or cfg.optim.global_batch_size)
    check_writable_dir(Path(args.out), "--out")
    if args.json:
        check_output_file(args.json, "--json")
    if not args.no_mlflow:
        uri = checked_uri(args, server=True)
        check_experiment(uri, args.experiment)
    result = finder.run_finder(cfg, device, args.batch, args.lr, args.lr_rule, args.every, args.window,
                               args.max_steps, args.max_batch, measure_hardware=not args.no_hardware)
    say("", finder.format_answer(result))
    files = finder.write_outputs(result, Path(args.out) / f"batch-size-{device.type}-{cfg.name}")
    say(*[f"  {path}" for path in files])
    if not args.no_mlflow:
        say(f"MLflow run {finder.record(uri, args.experiment, result, files, args.config)}")
    write_result_json(result, args.json, f"the answer is kept in {files[0]}")
    return 0


def scaling(args: argparse.Namespace) -> int:
    """When data parallelism pays: the cost model's table (or, with --measure, its check on this machine)."""
    from harness.bench import scaling as model

    model.check_arguments(args.world_sizes, args.link, args.link_gbps, args.link_latency_us, args.efficiency_floor,
                          args.parameters)
    if args.json:
        check_output_file(args.json, "--json")
    if args.measure:
        return _scaling_measure(args)
    if args.from_json and args.step_times:
        raise InputError("--step-times: given with --from-json; expected one source of step times")
    for batch in args.batch_sizes or ():
        if batch < 1:
            raise InputError(f"--batch-sizes: {batch}; expected positive global batch sizes")
    cfg = None if args.from_json else mlp_config(args, "scaling")
    if args.from_json:
        step_seconds, layer_sizes, source = model.load_capacity(args.from_json)
    elif args.step_times:
        step_seconds, layer_sizes = model.parse_step_times(args.step_times), list(cfg.layer_sizes)
        source = {"kind": "--step-times", "description": " ".join(args.step_times)}
    else:
        step_seconds, layer_sizes, source = _scaling_capacity_now(args, cfg)
    result = model.build_result(step_seconds, args.parameters or model.parameter_count(layer_sizes),
                                sorted({1, *args.world_sizes}),
                                model.links_from_arguments(args.link, args.link_gbps, args.link_latency_us),
                                args.collective, args.efficiency_floor, source, global_batches=args.batch_sizes)
    if not result["rows"]:
        raise InputError("--batch-sizes: no global batch has a measured step time at B and B / W; expected batch "
                         f"sizes within the measured {min(step_seconds)}..{max(step_seconds)}")
    say(model.format_table(result))
    write_result_json(result, args.json, "the table above is the result")
    return 0


def _scaling_capacity_now(args: argparse.Namespace, cfg) -> tuple[dict, list, dict]:
    """No step times given: measure them now, as `harness capacity` does (no MLflow run)."""
    from harness.bench.capacity import check_arguments, run_capacity

    check_arguments(args.max_batch, None, args.epoch_samples)
    device = checked_device(args.device)
    say(f"step times of {device.type}: {cfg.name}, batch 1, 2, 4, ... up to {args.max_batch}")
    measured = run_capacity(cfg, device, args.max_batch, None, args.epoch_samples)
    source = {"kind": "capacity measured now", "description": f"{device.type} {measured['device_name']}, "
              f"{measured['threads']} threads, {cfg.name}"}
    return {p["batch_size"]: p["step_s"] for p in measured["points"]}, list(cfg.layer_sizes), source


def _scaling_measure(args: argparse.Namespace) -> int:
    """The model checked against 2 gloo processes on 127.0.0.1: all-reduce times, 1- vs 2-rank DDP steps."""
    from harness.bench.scaling_check import DEFAULT_BATCHES, check_batches, format_report, run_check

    if args.from_json or args.step_times:
        raise InputError("--measure: given with --from-json or --step-times; expected --measure alone "
                         "(it measures its own step times)")
    cfg = mlp_config(args, "scaling --measure")
    batches = args.batch_sizes or list(DEFAULT_BATCHES)
    check_batches(batches, cfg.train_set_size)
    say(f"measuring on this machine: gloo all-reduce sweep and DDP steps of {cfg.name} at B = "
        f"{', '.join(map(str, batches))}, 2 ranks x 1 thread")
    result = run_check(cfg, batches)
    say(format_report(result))
    write_result_json(result, args.json, "the report above is the result")
    return 0


def replay(args: argparse.Namespace) -> int:
    """Deliver a spool of MLflow records that a run could not send."""
    spool = Spool(Path(args.spool))
    if not spool:
        raise InputError(f"{args.spool}: no spool file (or empty); expected the path a run printed")
    uri = checked_uri(args, server=True)
    count, bad = replay_spool(open_client(uri), spool)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        say(f"delivered {count} records to {uri}")
        raise InputError(f"{args.spool}: line(s) {shown} are not spool records (damaged); every other record "
                         "was delivered and the file is kept")
    say(f"delivered {count} records to {uri}; removed {args.spool}")
    return 0


def mlflow_server(args: argparse.Namespace) -> int:
    """A local MLflow server over sqlite (or PostgreSQL, --backend): artifacts folder, one worker, no job runners."""
    from harness.core.checkpoint import check_writable_dir

    check_port_free(args.host, args.port, "--port")
    check_writable_dir(Path(args.store_dir), "--store-dir")
    store = Path(args.store_dir).resolve()
    if args.backend == "postgresql":
        return serve_postgresql(store, args.host, args.port, args.pg_port)
    store.mkdir(parents=True, exist_ok=True)
    serve_sqlite(store, args.host, args.port)  # exec: the server takes this process's PID


def add_sweep_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """Which finished sweep (report, escape), where to look for it and where its files go."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep-run-id", help="the sweep's parent run id")
    which.add_argument("--latest", action="store_true",
                       help="the newest sweep of the experiment (the default when no --sweep-run-id)")
    parser.add_argument("--tracking-uri", help=URI_HELP)
    parser.add_argument("--experiment", default="minibatch-harness", help="MLflow experiment to look in")
    parser.add_argument("--out", default="reports", help=out_help)


def add_measure_arguments(parser: argparse.ArgumentParser, config_help: str, set_example: str,
                          device_help: str = DEVICE_HELP) -> None:
    """What a measuring command (bench, capacity, scaling) builds its model from, where it runs, where its
    result goes."""
    parser.add_argument("--config", default="configs/fashion_mnist.yaml", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config key (repeatable){set_example}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=device_help)
    parser.add_argument("--json", help="also write the result here")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="harness", description="Tools around training runs: check the backward pass, "
                            "report on a sweep, time the device, find a batch size, serve MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help_: str) -> argparse.ArgumentParser:
        # The listing's phrase, and as a sentence the first line of the subcommand's own --help.
        sub = commands.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        sub.set_defaults(handler=handler)
        return sub

    add_config_arguments(command("gradcheck", gradcheck, "compare the hand-written backward pass with autograd"))
    rep = command("report", report, "tables and plots of a finished sweep, from MLflow")
    add_sweep_arguments(rep, "folder for the files (one subfolder per sweep)")
    rep.add_argument("--no-interpolation", action="store_true",
                     help="skip the loss along the line between the smallest and largest healthy batch's weights")
    inter = command("interpolate", interpolate, "loss and accuracy on the line between two runs' weights "
                    "(Keskar et al. 2017)")
    inter.add_argument("--run-a", required=True, help="run A (α = 0): MLflow run id, checkpoint file or a run's "
                       "checkpoint folder (its newest epoch-*.pt) (required)")
    inter.add_argument("--run-b", required=True, help="run B (α = 1), the same kinds (required)")
    inter.add_argument("--alpha-min", type=float, default=-1.0, help="first α of the grid")
    inter.add_argument("--alpha-max", type=float, default=2.0, help="last α of the grid")
    inter.add_argument("--points", type=int, default=25, help="α values, evenly spaced, both ends included")
    inter.add_argument("--label-a", help="name of A on the plot (default: B=<its batch size>)")
    inter.add_argument("--label-b", help="name of B on the plot (default: B=<its batch size>)")
    inter.add_argument("--tracking-uri", help=f"where run ids are looked up and the new run goes; {URI_HELP}")
    inter.add_argument("--experiment", default="minibatch-harness", help="MLflow experiment of the new run")
    inter.add_argument("--no-mlflow", action="store_true", help="write the CSV and plot only, log no MLflow run")
    inter.add_argument("--out", default="reports", help="folder for the files (subfolder interpolate-<a>-<b>)")
    inter.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    inter.add_argument("--eval-batch-size", type=int, default=10000, help="samples per forward pass when scoring")
    esc = command("escape", escape, "continue a sweep's smallest- and largest-batch solutions with each other's "
                  "batch size (and their own, as control)")
    add_sweep_arguments(esc, "folder for the files (one subfolder per escape run)")
    esc.add_argument("--epochs", type=int, default=5, help="epochs every continuation trains")
    ben = command("bench", bench, "time the training step against a plain DataLoader loop")
    add_measure_arguments(ben, "YAML file: data set and model to time", "")
    ben.add_argument("--batch-sizes", type=int, nargs="+", help="global batch sizes to time (default "
                     f"{' '.join(map(str, BENCH_BATCH_SIZES))}; with --stack {' '.join(map(str, STACK_BATCH_SIZES))})")
    ben.add_argument("--epochs", type=int, default=3, help="timed epochs per path (after one warm-up)")
    ben.add_argument("--paths", nargs="+", metavar="PATH",
                     help="which of the bench's paths to time: dataloader, harness, harness_ddp, harness_graph, "
                     "harness_graph_ddp (default all; the dataloader peer always runs)")
    ben.add_argument("--stack", type=int, metavar="K", help="instead: K trials (seeds seed..seed+K-1) trained as "
                     "one stacked model against the same K one after another (core/stacked.py)")
    ben.add_argument("--tf32", action="store_true", help="every side's fp32 matrix products on CUDA in TF32 (tensor "
                     "cores), for this bench only; training itself stays fp32")
    ben.add_argument("--profile", metavar="DIR",
                     help="with --stack: also profile one more epoch of the stack and of one trial alone per batch "
                     "size (torch.profiler; the kernels on a GPU), a table per batch size into DIR")
    cap = command("capacity", capacity, "time per step and memory at batch 1, 2, 4, ...: where the device stops "
                  "being parallel, the largest batch that fits, and the accumulation beyond it")
    add_measure_arguments(cap, "YAML file: data set and model", ", e.g. performance.precision=bf16")
    cap.add_argument("--max-batch", type=int, default=8192, help="largest batch size to try (a power of two "
                     "or not: the doubling stops at or below it; the training set's size caps it too)")
    cap.add_argument("--memory-limit", type=float, metavar="GB",
                     help="stop before a batch whose peak memory exceeds this many GB (1e9 bytes)")
    cap.add_argument("--epoch-samples", type=int, default=CAPACITY_EPOCH_SAMPLES,
                     help="samples in the timed epoch, at most the training set (a whole epoch at batch 1 takes "
                     "minutes on a CPU)")
    cap.add_argument("--out", default="reports", help="folder for the files (subfolder capacity-<device>-<config>)")
    cap.add_argument("--tracking-uri", help=URI_HELP)
    cap.add_argument("--experiment", default="minibatch-harness", help="MLflow experiment of the new run")
    cap.add_argument("--no-mlflow", action="store_true", help="write the table, JSON and plot only")
    bsz = command("batch-size", batch_size, "which batch size to use: predicted steps, samples and time to the "
                  "config's target for every batch, from one short run's noise scale and the device's time per step")
    add_measure_arguments(bsz, "YAML file: data set, model, optimizer and accuracy targets", "")
    bsz.add_argument("--batch", type=int, help="the small batch the statistics run trains at (default: the "
                     "config's optim.global_batch_size)")
    bsz.add_argument("--lr", type=float, help="its LR (default: the config's optim.lr): about the tuned one at --batch")
    bsz.add_argument("--lr-rule", default="noise", choices=("noise", "sqrt", "linear", "none"),
                     help="the LR column: noise (McCandlish et al.: lr (1 + B_crit/B0) / (1 + B_crit/B)), sqrt, "
                     "linear or none, from --lr at --batch")
    bsz.add_argument("--every", type=int, default=25, help="steps between noise readings")
    bsz.add_argument("--window", type=int, default=4, help="consecutive steps each reading averages")
    bsz.add_argument("--max-steps", type=int, help="step budget when a target is not reached (default: the "
                     "config's epochs)")
    bsz.add_argument("--max-batch", type=int, default=8192, help="largest candidate batch (and capacity's)")
    bsz.add_argument("--no-hardware", action="store_true", help="skip the time per step: statistics only")
    bsz.add_argument("--out", default="reports", help="folder for the files (subfolder batch-size-<device>-<config>)")
    bsz.add_argument("--tracking-uri", help=URI_HELP)
    bsz.add_argument("--experiment", default="minibatch-harness", help="MLflow experiment of the new run")
    bsz.add_argument("--no-mlflow", action="store_true", help="print and write the files only")
    sca = command("scaling", scaling, "when data parallelism pays: time per step, throughput and efficiency "
                  "against world size and link, from measured step times (a cost model); --measure checks it "
                  "against 2 real gloo processes here")
    sca.add_argument("--from-json", help="step times and layer sizes from a `harness capacity --json` "
                     "result (default: measure them now, as capacity does)")
    sca.add_argument("--step-times", nargs="+", metavar="BATCH=SECONDS",
                     help="step times given by hand (e.g. from another device); the model is --config's")
    add_measure_arguments(sca, "YAML file: data set and model", ", e.g. model.hidden_sizes=[50000]",
                        "where step times are measured now: auto = cuda where available, else cpu")
    sca.add_argument("--max-batch", type=int, default=8192, help="largest batch measured now")
    sca.add_argument("--epoch-samples", type=int, default=4096, help="samples of capacity's timed epoch")
    sca.add_argument("--parameters", type=int, help="gradient elements (default: the MLP's parameter count)")
    sca.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 8, 64], metavar="W",
                     help="ranks (devices) to predict for; 1 is always included")
    sca.add_argument("--batch-sizes", type=int, nargs="+", metavar="B", help="global batches (default: the measured "
                     "ones); with --measure: the timed global batches (default 32 128 512 2048)")
    sca.add_argument("--link", action="append", default=[], metavar="NAME",
                     help="a named link: nvlink (300 GB/s, 5 us) or ethernet-100g (12.5 GB/s, 30 us), assumptions "
                     "(docs/performance.md); repeatable; default: both unless --link-gbps")
    sca.add_argument("--link-gbps", type=float, help="a custom link's bandwidth in Gb/s")
    sca.add_argument("--link-latency-us", type=float, help="the custom link's latency per message in us (default 0)")
    sca.add_argument("--collective", default="ring", choices=("ring", "tree"),
                     help="latency term: 2(W-1) messages (ring) or 2 log2 W (tree); bandwidth term 2(W-1)/W x bytes")
    sca.add_argument("--efficiency-floor", type=float, default=0.5,
                     help="below this scaling efficiency, data parallelism 'stops paying'")
    sca.add_argument("--measure", action="store_true", help="measure gloo all-reduce times and 1- vs 2-rank DDP "
                     "steps on this machine and compare them with the model")
    rp = command("replay", replay, "deliver MLflow records a run spooled while the server was down")
    rp.add_argument("spool", help="the spool file the run printed (checkpoints/<run>/mlflow-spool.jsonl)")
    rp.add_argument("--tracking-uri", help=URI_HELP)
    srv = command("mlflow-server", mlflow_server, "a local MLflow server for the UI (127.0.0.1 by default)")
    srv.add_argument("--host", default="127.0.0.1", help="127.0.0.1; another address exposes every run")
    srv.add_argument("--port", type=int, default=5000, help="port on --host")
    srv.add_argument("--store-dir", default=".", help="folder of mlflow.db (or mlflow-pg/) and mlartifacts/")
    srv.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"),
                     help="sqlite: one file; postgresql: a PostgreSQL of its own in <store-dir>/mlflow-pg/ "
                     "(127.0.0.1, generated password), for many concurrent writers")
    srv.add_argument("--pg-port", type=int,
                     help="PostgreSQL's port on 127.0.0.1 (--backend postgresql; default: a free one)")
    return parser


# A termination signal ends what a command started (escape's training runs, an interpolation run)
# as KILLED, and exits 128+signal with one line.
@signals.exits_on_termination(after="a run it started is marked KILLED")
@exits_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("gradcheck", "bench", "interpolate", "capacity", "scaling", "batch-size"):
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
