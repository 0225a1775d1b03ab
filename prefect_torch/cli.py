"""The ``prefect-torch`` command: train, predict, demo, sweep, pools.

User errors (bad data, bad options, a Prefect home this Prefect cannot use)
print one clear message and exit with status 2; ``--debug`` shows the
traceback too. What can be checked cheaply (the data file, its columns, the
options) is checked before Prefect starts, so such errors come in a second,
with nothing from Prefect before them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect_torch.exiting import exit_without_teardown

EXIT_USER_ERROR = 2

DEMO_DATASETS = {
    "housing": ("housing.csv", "price"),
    "churn": ("churn.csv", "churned"),
}


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,32; got {text!r}") from None


def _csv_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--problem", choices=["auto", "regression", "binary", "multiclass"], default="auto")
    group.add_argument("--epochs", type=int, default=20)
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    group.add_argument("--optimizer", default="adam", help="adam, adamw, sgd or rmsprop")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--momentum", type=float, default=0.0)
    group.add_argument("--hidden", type=_csv_ints, default=[64, 64], help="hidden layer sizes, e.g. 64,32")
    group.add_argument("--activation", default="relu", help="relu, gelu, silu, tanh, leaky_relu, elu, sigmoid")
    group.add_argument("--dropout", type=float, default=0.0)
    group.add_argument("--norm", default="none", help="none, batch or layer")
    group.add_argument("--loss", default="auto", help="auto, mse, mae, huber, bce, cross_entropy")
    group.add_argument("--scheduler", default="none", help="none, step, cosine or plateau")
    group.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    group.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    group.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    group.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this value")
    group.add_argument("--val-fraction", type=float, default=0.15)
    group.add_argument("--test-fraction", type=float, default=0.15)
    group.add_argument("--processes", type=int, default=1,
                       help="train data-parallel on N processes (DDP; one GPU each on CUDA)")
    group.add_argument("--stepwise", action="store_true", help="run every step as its own card (slower, inspectable)")
    parser.add_argument("--output", default=None, help="folder to save the model to")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message}. See `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prefect-torch", description="Train PyTorch models as Prefect flows.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model on a CSV or Parquet file")
    train.add_argument("data", help="path or URL (s3://...) of a CSV or Parquet file")
    train.add_argument("--target", required=True, help="column to predict")
    train.add_argument("--features", type=_csv_names, default=None, help="feature columns (default: all others)")
    train.add_argument("--format", choices=["auto", "csv", "parquet"], default="auto")
    _add_training_options(train)

    predict = commands.add_parser("predict", help="predict with a saved model")
    predict.add_argument("model", help="model folder (a train run's model_uri)")
    predict.add_argument("data", help="CSV or Parquet file with the feature columns")
    predict.add_argument("--output", required=True, help="where to write predictions (.csv or .parquet)")
    predict.add_argument("--proba", action="store_true", help="also write class probabilities")

    demo = commands.add_parser("demo", help="train on a bundled example dataset")
    demo.add_argument("--dataset", choices=sorted(DEMO_DATASETS), default="housing")
    _add_training_options(demo)

    sweep = commands.add_parser("sweep", help="search hyperparameters: an Optuna study whose trials are training runs")
    sweep.add_argument("data", help="path or URL (s3://...) of a CSV or Parquet file")
    sweep.add_argument("--target", required=True, help="column to predict")
    sweep.add_argument("--features", type=_csv_names, default=None, help="feature columns (default: all others)")
    sweep.add_argument("--format", choices=["auto", "csv", "parquet"], default="auto")
    sweep.add_argument("--space", required=True,
                       help="YAML or JSON file: field name -> {log_uniform|uniform|int: [lo, hi]} or {choice: [...]}")
    sweep.add_argument("--trials", type=int, default=20, help="trials the study should have finished")
    sweep.add_argument("--parallel", type=int, default=1, help="trials at the same time")
    sweep.add_argument("--metric", default="val_loss", help="val_loss (default), r2 or accuracy, on the validation split")
    sweep.add_argument("--direction", choices=["auto", "min", "max"], default="auto",
                       help="minimise or maximise the metric (auto: max for r2/accuracy, min for val_loss)")
    sweep.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler")
    sweep.add_argument("--pruner", choices=["median", "none"], default="median")
    sweep.add_argument("--pruner-startup", type=int, default=5, help="trials that finish before any is pruned")
    sweep.add_argument("--deployment", default=None,
                       help="run trials as flow runs of this deployment on its work pool, e.g. pool-train/train-cpu")
    sweep.add_argument("--study-storage-block", default=None,
                       help="saved Torch Sweep Storage block (PostgreSQL URL) holding the study")
    sweep.add_argument("--storage-block", default=None, help="saved Torch Storage block for the models")
    sweep.add_argument("--heartbeat-s", type=int, default=10,
                       help="seconds between trial heartbeats; a killed sweep's trials are retried after 3")
    sweep.add_argument("--model-name", default=None, help="register the best model under this name")
    _add_training_options(sweep)

    warm = commands.add_parser(
        "warm", help="the warm process that runs training commands without importing torch and Prefect each time"
    )
    warm.add_argument("warm_command", choices=["status", "stop"],
                      help="status: list this user's warm processes; stop: stop them all")

    pools = commands.add_parser("pools", help="work pools for deployments")
    pool_commands = pools.add_subparsers(dest="pools_command", required=True)
    create = pool_commands.add_parser(
        "create", help="create the cpu and cuda work pools and the gpu tag limit on PREFECT_API_URL (idempotent)"
    )
    create.add_argument("--type", dest="pool_type", choices=["process", "kubernetes"], default="process")
    create.add_argument("--gpu-limit", type=int, default=1, help="task runs tagged gpu at once (new limit only)")
    create.add_argument("--gpus-per-pod", type=int, default=1,
                        help="kubernetes: GPUs each cuda-pool pod requests, with /dev/shm sized for NCCL (new pool only)")
    return parser


def _pools(args: argparse.Namespace) -> int:
    from prefect_torch.deployments import ensure_work_pools

    done = ensure_work_pools(pool_type=args.pool_type, gpu_limit=args.gpu_limit, gpus_per_pod=args.gpus_per_pod)
    print("\n".join([f"created {item}" for item in done["created"]]
                    + [f"exists  {item} (left unchanged)" for item in done["existing"]]), flush=True)
    return 0


def _warm(args: argparse.Namespace) -> int:
    from prefect_torch.warm.client import process_alive, stop_warm_processes, warm_processes
    from prefect_torch.warm.place import ENABLE_VARIABLE, enabled

    if args.warm_command == "stop":
        asked = stop_warm_processes()
        busy = [p for p in asked if process_alive(p["pid"])]
        done = len(asked) - len(busy)
        line = f"stopped {done} warm process{'es' if done != 1 else ''}"
        if busy:
            line += f"; {len(busy)} more will stop when the commands they are running end"
        print(line, flush=True)
        return 0
    processes = warm_processes()
    state = "on" if enabled(os.environ) else f"off ({ENABLE_VARIABLE}=0, or not Linux)"
    lines = [f"warm processes: {state}; {len(processes)} running"]
    lines += [f"  pid {p['pid']:<8} {'ready' if p['ready'] else 'starting':<9} key {p['key']}  log {p['log']}"
              for p in processes]
    print("\n".join(lines), flush=True)
    return 0


def _flow_parameters(args: argparse.Namespace, uri: str, target: str) -> dict[str, Any]:
    return {
        "dataset": {
            "uri": uri, "target": target, "features": getattr(args, "features", None),
            "format": getattr(args, "format", "auto"), "problem": args.problem,
            "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
        },
        "model": {"hidden": args.hidden, "activation": args.activation, "dropout": args.dropout,
                  "norm": args.norm, "seed": args.seed},
        "optimizer": {"name": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
                      "momentum": args.momentum},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "accumulate": args.accumulate,
                     "clip": args.clip, "loss": args.loss, "scheduler": {"name": args.scheduler},
                     "early_stopping_patience": args.patience, "seed": args.seed, "device": args.device,
                     "precision": args.precision, "compile": args.compile,
                     "processes": getattr(args, "processes", 1)},
        "output": args.output,
    }


def _validated(parameters: dict[str, Any]) -> dict[str, Any]:
    """Build the typed specs up front so option errors read as option errors."""
    from prefect_torch.engine.loop import TrainSpec
    from prefect_torch.engine.models import ModelSpec
    from prefect_torch.engine.optim import OptimizerSpec
    from prefect_torch.engine.dataset import DatasetSpec

    return {
        "dataset": DatasetSpec.model_validate(parameters["dataset"]),
        "model": ModelSpec.model_validate(parameters["model"]),
        "optimizer": OptimizerSpec.model_validate(parameters["optimizer"]),
        "training": TrainSpec.model_validate(parameters["training"]),
        "output": parameters["output"],
    }


def _run_training(args: argparse.Namespace, uri: str, target: str) -> int:
    parameters = _validated(_flow_parameters(args, uri, target))
    if args.device == "cuda":
        from prefect_torch.engine.device import resolve_device

        resolve_device("cuda")  # fail before starting Prefect
    from prefect_torch.runtime import run_cli_flow

    if args.stepwise:
        from prefect_torch.flows import stepwise_train_flow as chosen
    else:
        from prefect_torch.flows import train_flow as chosen
    result = run_cli_flow(chosen, **parameters)
    _report(result, args.json)
    return 0


def _read_space(path: str) -> Any:
    """The search space file: YAML (JSON is YAML too)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise _UsageError(f"Cannot read the search space file {path}: {exc.strerror or exc}.") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise _UsageError(f"The search space file {path} is not valid YAML or JSON{line}.") from None


def _sweep(args: argparse.Namespace) -> int:
    from prefect_torch.flows.sweep import PrunerSpec, SweepSpec, check_sweep

    parameters = _validated(_flow_parameters(args, args.data, args.target))
    direction = {"auto": "auto", "min": "minimize", "max": "maximize"}[args.direction]
    spec = SweepSpec(
        trials=args.trials, parallel=args.parallel, metric=args.metric, direction=direction, seed=args.sampler_seed,
        pruner=PrunerSpec(name=args.pruner, startup_trials=args.pruner_startup), deployment=args.deployment,
        study_storage_block=args.study_storage_block, heartbeat_s=args.heartbeat_s,
    )
    # Refuse typos and impossible ranges before Prefect starts, let alone a trial.
    space = check_sweep(_read_space(args.space), parameters["model"], parameters["optimizer"],
                        parameters["training"], spec)
    from prefect_torch.flows.sweep import sweep_flow
    from prefect_torch.runtime import run_cli_flow

    result = run_cli_flow(
        sweep_flow, dataset=parameters["dataset"], space=space, sweep=spec, model=parameters["model"],
        optimizer=parameters["optimizer"], training=parameters["training"], storage_block=args.storage_block,
        model_name=args.model_name,
    )
    best = result.best
    counts: dict[str, int] = {}
    for trial in result.trials:
        counts[trial.state] = counts.get(trial.state, 0) + 1
    lines = [f"study {result.study_name}: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())),
             f"best trial {best.number}: {result.metric} {best.value:.6g} with "
             + ", ".join(f"{k}={json.dumps(v)}" for k, v in best.params.items())]
    lines += [f"  {name:<9} {value:.4f}" for name, value in best.metrics.items()]
    lines.append(f"model saved to {best.model_uri}")
    print("\n".join(lines), flush=True)
    if args.json:
        summary = {
            "study": result.study_name, "metric": result.metric, "direction": result.direction,
            "best": {"number": best.number, "params": best.params, "value": best.value, "metrics": best.metrics,
                     "model_uri": best.model_uri, "registered_version": best.registered_version},
            "trials": [{"number": t.number, "params": t.params, "value": t.value, "state": t.state}
                       for t in result.trials],
            "run_here": result.run_here,
        }
        print(json.dumps(summary, default=float), flush=True)
    return 0


def _report(result, as_json: bool) -> None:
    summary = {
        "metrics": result.metrics,
        "history": result.history,
        "model_uri": result.model_uri,
        "problem": result.problem,
        "stop_reason": result.stop_reason,
        "data_key": result.data_key,
        "device": result.device,
        "train_seconds": result.train_seconds,
    }
    lines = [f"problem: {result.problem} (loss {result.loss}, {result.steps} steps on {result.device})"]
    lines += [f"  {name:<9} {value:.4f}" for name, value in result.metrics.items()]
    lines.append(f"model saved to {result.model_uri}")
    print("\n".join(lines), flush=True)
    if as_json:
        print(json.dumps(summary, default=float), flush=True)


def _predict(args: argparse.Namespace) -> int:
    from prefect_torch.engine.data import LoadSpec, load_table
    from prefect_torch.engine.persist import load_model

    model = load_model(args.model)
    frame = load_table(LoadSpec(uri=args.data)).frame
    out = frame.copy()
    out[f"predicted_{model.info.target}"] = model.predict(frame).to_numpy()
    if args.proba:
        if model.info.problem == "regression":
            raise _UsageError("--proba is for classification models; this model is a regression model.")
        proba = model.predict_proba(frame)
        out[list(proba.columns)] = proba.to_numpy()
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".parquet", ".pq"):
        out.to_parquet(path, index=False)
    else:
        out.to_csv(path, index=False)
    print(f"wrote {len(out)} predictions to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    filename, target = DEMO_DATASETS[args.dataset]
    path = resources.files("prefect_torch.examples") / "data" / filename
    print(f"demo: training on the bundled {args.dataset} dataset ({filename}, target {target!r})", flush=True)
    return _run_training(args, str(path), target)


class _UsageError(Exception):
    pass


def _hide_user_error_tracebacks() -> None:
    """Prefect's console log prints a task's traceback on failure; for a user error
    (bad data, bad option) the one-line message is the useful part. The API logs,
    which the Prefect UI shows, keep the full traceback."""
    import logging

    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and handler.formatter is not None:
                handler.formatter.format = _without_user_tracebacks(handler.formatter.format)  # type: ignore[method-assign]


def _without_user_tracebacks(format_record):
    from prefect_torch.errors import PrefectTorchError

    def format(record):
        if not (record.exc_info and isinstance(record.exc_info[1], PrefectTorchError)):
            return format_record(record)
        # Another handler may already have cached the traceback text on the record.
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return format_record(record)
        finally:
            record.exc_info, record.exc_text = saved

    return format


def _check_input(args: argparse.Namespace) -> None:
    """The cheap checks, before Prefect is imported: file, format, columns, options."""
    from prefect_torch.engine.peek import check_columns

    if args.command == "train":
        check_columns(args.data, args.target, args.features, args.format)
    if args.command in ("train", "demo"):
        from prefect_torch.engine.loop import TrainSpec
        from prefect_torch.engine.models import ModelSpec
        from prefect_torch.engine.optim import OptimizerSpec

        parameters = _flow_parameters(args, "", "")
        ModelSpec.model_validate(parameters["model"])
        OptimizerSpec.model_validate(parameters["optimizer"])
        TrainSpec.model_validate(parameters["training"])
    elif args.command == "predict":
        check_columns(args.data)
        if not Path(args.model).expanduser().exists() and "://" not in args.model:
            raise _UsageError(f"Model folder not found: {args.model}. Pass the model_uri a train run printed.")


def _start_reading(args: argparse.Namespace) -> None:
    """Read a dataset the cache has not seen in the background, while Prefect is imported
    and the flow run starts, and split it there as soon as it is read: the Data Load and
    Data Split cards then take the table and the splits instead of computing them
    (``engine.data.start_loading``, ``engine.split.start_splitting``). The load and split
    specs are the flow's own, from the same ``DatasetSpec``; options the flow will refuse
    start nothing (the flow says why, in its own words)."""
    from pydantic import ValidationError

    from prefect_torch.engine.data import start_loading
    from prefect_torch.engine.dataset import DatasetSpec
    from prefect_torch.engine.fingerprint import cache_folder
    from prefect_torch.engine.split import start_splitting
    from prefect_torch.engine.tensorfile import default_cache_dir
    from prefect_torch.errors import ConfigError

    try:
        dataset = DatasetSpec.model_validate(_flow_parameters(args, args.data, args.target)["dataset"])
        load_spec, split_spec = dataset.load_spec(), dataset.split_spec()
    except (ConfigError, ValidationError):
        return
    # Prefect's home as Prefect will find it; a home set elsewhere (a prefect.toml) only
    # means a file the cache knows may be read here for nothing.
    home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    # The split's tensor file is written ahead beside Prefect's tensor cache, on the file
    # system of the default storage, where the card renames it into place.
    stage_in = default_cache_dir(home)
    start_loading(load_spec, cache_folder(home),
                  then=lambda table, generation: start_splitting(table, split_spec, generation, stage_in))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        _check_input(args)
    except Exception as exc:  # noqa: BLE001 - as below
        if not _is_user_error(exc) or args.debug:
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.command == "train":
        _start_reading(args)
    if not args.debug and args.command not in ("predict", "warm"):
        _hide_user_error_tracebacks()
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "train": lambda a: _run_training(a, a.data, a.target),
        "predict": _predict,
        "demo": _demo,
        "sweep": _sweep,
        "pools": _pools,
        "warm": _warm,
    }
    try:
        return handlers[args.command](args)
    except Exception as exc:  # noqa: BLE001 - user errors become one line, others keep their traceback
        if not _is_user_error(exc) or args.debug:
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _is_user_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    from prefect_torch.errors import PrefectTorchError

    return isinstance(exc, (PrefectTorchError, ValidationError, _UsageError))


def _message(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
        return "invalid option: " + "; ".join(problems)
    return str(exc)


def run() -> None:
    """The ``prefect-torch`` command: ``main()`` in a warm process, or here; then a quick exit.

    A training command goes to the warm process for this environment when one
    is running (see ``prefect_torch.warm``), which saves the seconds of
    importing torch and Prefect. Otherwise it runs here and starts a warm
    process for the next command.

    Once the command is done, the exit hooks run (Prefect's, logging's) as on any
    exit, output is flushed, and the process ends without the interpreter's
    teardown of every torch, Prefect and pydantic object, which writes nothing
    and takes about a second on two cores. With threads still running (none
    should be) the normal exit is kept, so nothing is cut short.
    """
    from prefect_torch.warm.client import run_warm, start_in_background

    argv = sys.argv[1:]
    environ = dict(os.environ)  # as the user set it: running a command changes os.environ
    code = run_warm(argv, environ)
    if code is None:
        code = main(argv)
        start_in_background(argv, environ)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    exit_without_teardown(code)


if __name__ == "__main__":
    run()
