"""Task run names that say what ran, e.g. ``data_split[target=price 70/15/15]``.

Each function is a ``task_run_name`` callable: Prefect calls it inside the task
run, where ``prefect.runtime.task_run.parameters`` holds the call's arguments.
"""

from __future__ import annotations

from typing import Any

from prefect_torch.reporting.text import display_uri


def _parameters() -> dict[str, Any]:
    from prefect.runtime import task_run

    return task_run.parameters


def data_load_run_name() -> str:
    """``data_load[…/data/housing.csv]``: where the data came from, without credentials."""
    spec = _parameters().get("spec")
    uri = getattr(spec, "uri", None)
    return f"data_load[{display_uri(uri, max_length=48)}]" if uri else "data_load"


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
    """``model_save[…/models/train-3f2a…]``: where the model goes."""
    output = _parameters().get("output")
    return f"model_save[{display_uri(output, max_length=48)}]" if output else "model_save"
