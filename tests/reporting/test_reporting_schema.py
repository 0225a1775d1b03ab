"""Every flow's parameter form: titles, descriptions, defaults and enums on every field."""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest
from prefect import Flow
from pydantic import BaseModel, Field
from prefect.utilities.callables import parameter_schema

import prefect_torch.flows as flows

FLOWS = [getattr(flows, name) for name in flows.__all__ if isinstance(getattr(flows, name), Flow)]


def fields(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, field schema, required) for every property of the form and of every definition."""
    sections = [("parameters", schema)]
    for defs_key in ("definitions", "$defs"):
        sections += [(name, definition) for name, definition in schema.get(defs_key, {}).items()]
    for owner, section in sections:
        required = set(section.get("required", []))
        for name, field in section.get("properties", {}).items():
            yield f"{owner}.{name}", field, name in required


def resolve(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    ref = field.get("$ref") or next((part["$ref"] for part in field.get("allOf", []) if "$ref" in part), None)
    if not ref:
        return field
    _, defs_key, name = ref.split("/")
    return schema[defs_key][name]


def test_the_package_exports_flows():
    assert FLOWS, "prefect_torch.flows exports no flows"


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_field_has_a_title_and_a_description(flow):
    schema = parameter_schema(flow).model_dump_for_openapi()
    missing = [
        f"{path} lacks {what}"
        for path, field, _ in fields(schema)
        for what in ("title", "description")
        if not str(field.get(what, "")).strip()
    ]
    assert not missing, f"{flow.name}: " + "; ".join(missing)


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_optional_field_shows_its_default(flow):
    schema = parameter_schema(flow).model_dump_for_openapi()
    missing = [path for path, field, required in fields(schema) if not required and "default" not in field]
    assert not missing, f"{flow.name}: no default in the form for " + ", ".join(missing)


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_definition_is_described(flow):
    schema = parameter_schema(flow).model_dump_for_openapi()
    definitions = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    assert not [name for name, d in definitions.items() if not d.get("description")]


def test_choices_are_enums_in_the_train_form():
    schema = parameter_schema(flows.train_flow).model_dump_for_openapi()
    by_path = {path: field for path, field, _ in fields(schema)}
    expected = {
        "OptimizerSpec.name": {"adam", "adamw", "sgd", "rmsprop"},
        "TrainSpec.loss": {"auto", "mse", "mae", "huber", "bce", "cross_entropy"},
        "TrainSpec.device": {"auto", "cpu", "cuda"},
        "TrainSpec.precision": {"fp32", "bf16"},
        "DatasetSpec.problem": {"auto", "regression", "binary", "multiclass"},
        "DatasetSpec.format": {"auto", "csv", "parquet"},
        "ModelSpec.activation": {"relu", "gelu", "silu", "tanh", "leaky_relu", "elu", "sigmoid"},
        "SchedulerSpec.name": {"none", "step", "cosine", "plateau"},
    }
    for path, choices in expected.items():
        assert set(by_path[path].get("enum", [])) == choices, path


def test_the_train_form_defaults_are_the_spec_defaults():
    schema = parameter_schema(flows.train_flow).model_dump_for_openapi()
    properties = schema["properties"]
    assert properties["optimizer"]["default"]["name"] == "adam"
    assert properties["training"]["default"]["device"] == "auto"
    assert properties["model"]["default"]["hidden"] == [64, 64]
    assert resolve(schema, properties["dataset"])["required"] == ["uri", "target"]



class _Inner(BaseModel):
    """Documented model, undocumented field."""

    size: int = 3


class _Outer(BaseModel):
    """Outer."""

    inner: _Inner = Field(default=_Inner(), description="Nested.")


def _undocumented(spec: _Outer, flag: bool = False) -> None:
    """No Args section."""


def test_the_walk_finds_undescribed_fields_at_every_level():
    schema = parameter_schema(_undocumented).model_dump_for_openapi()
    missing = {path for path, field, _ in fields(schema) if not field.get("description")}
    assert missing == {"parameters.spec", "parameters.flag", "_Inner.size"}


@pytest.mark.parametrize("name, title", [
    ("uri", "URI"), ("lr", "Learning rate"), ("min_lr", "Min learning rate"),
    ("start_timeout_s", "Start timeout (s)"), ("val_fraction", "Validation fraction"),
    ("early_stopping_patience", "Early stopping patience"), ("kwargs", "Keyword arguments"),
])
def test_titles_read_as_a_person_writes_them(name, title):
    from prefect_torch.engine.spec import human_title

    assert human_title(name) == title


def test_the_forms_show_those_titles():
    titles = {}
    for flow in FLOWS:
        schema = parameter_schema(flow).model_dump_for_openapi()
        titles.update({path: field.get("title") for path, field, _ in fields(schema)})
    assert titles["DatasetSpec.uri"] == "URI"
    assert titles["OptimizerSpec.lr"] == "Learning rate"
    assert titles["SchedulerSpec.min_lr"] == "Min learning rate"
    assert titles["RoutingSpec.start_timeout_s"] == "Start timeout (s)"
    assert not [path for path, title in titles.items() if title and re.search(r"\b(Uri|Lr)\b|\bS$", title)]
