"""Task run names that say what ran, e.g. ``data_split[target=price 70/15/15]``.

Each function is a ``task_run_name`` callable: Prefect calls it inside the task
run, where ``prefect.runtime.task_run.parameters`` holds the call's arguments.
"""

from __future__ import annotations

from typing import Any

from prefect_torch.reporting.text import display_uri, truncate

# A run name shows a file or folder name up to this long, cut at its end.
MAX_NAME_CHARS = 40


def _parameters() -> dict[str, Any]:
    from prefect.runtime import task_run

    return task_run.parameters


def file_name(uri: object) -> str:
    """The last part of a path or URL (``housing.csv``), without credentials or query, for
    a run name: a whole name, never a path cut in the middle of a word."""
    text = display_uri(str(uri), max_length=10_000).rstrip("/")
    name = text.rsplit("/", 1)[-1] or text
    return truncate(name, MAX_NAME_CHARS)


def data_load_run_name() -> str:
    """``data_load[housing.csv]``: the file the data came from."""
    spec = _parameters().get("spec")
    uri = getattr(spec, "uri", None)
    return f"data_load[{file_name(uri)}]" if uri else "data_load"


def data_split_run_name() -> str:
    """``data_split[target=price 70/15/15]``: the target and the train/val/test shares."""
    spec = _parameters().get("spec")
    if spec is None or not hasattr(spec, "target"):
        return "data_split"
    val, test = spec.val_fraction, spec.test_fraction
    shares = "/".join(f"{100 * share:.0f}" for share in (1 - val - test, val, test))
    return f"data_split[target={spec.target} {shares}]"


def model_define_run_name() -> str:
    """``model_define[mlp-64x64]``."""
    spec = _parameters().get("spec")
    return f"model_define[{spec.short_name()}]" if hasattr(spec, "short_name") else "model_define"


def model_save_run_name() -> str:
    """``model_save[train-3f2a9c…]``: the folder the model goes to."""
    output = _parameters().get("output")
    return f"model_save[{file_name(output)}]" if output else "model_save"


def init_optimizer_run_name() -> str:
    """``training_init_optimizer[adam lr=0.003]``: which optimizer, no random suffix."""
    spec = _parameters().get("spec")
    return f"training_init_optimizer[{spec.short_name()}]" if hasattr(spec, "short_name") else "training_init_optimizer"
