"""The base of every user-facing spec: pydantic, strict, errors as ConfigError."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from prefect_torch.errors import ConfigError

# Nested specs are validated inside their parent's validation; only the outermost
# one turns pydantic's error into a ConfigError, so field paths stay whole.
_validating: ContextVar[bool] = ContextVar("prefect_torch_validating", default=False)


def describe_validation_error(exc: ValidationError, what: str) -> str:
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across fields: its message says it all
            problems.append(message)
            continue
        where = ".".join(str(part) for part in error["loc"])
        got = f" (got {error['input']!r})" if "input" in error and error["type"] != "missing" else ""
        problems.append(f"{where}: {message}{got}")
    return f"Invalid {what}: " + "; ".join(p.rstrip(".") for p in problems) + "."


# Words a person writes differently from the field name's part.
_TITLE_WORDS = {"uri": "URI", "lr": "learning rate", "s": "(s)", "id": "ID", "val": "validation", "kwargs": "keyword arguments"}


def human_title(name: str, _info: Any = None) -> str:
    """The form title of a field: ``min_lr`` → "Min learning rate", ``start_timeout_s`` →
    "Start timeout (s)", ``uri`` → "URI" (the UI shows it above the field)."""
    words = [_TITLE_WORDS.get(word, word) for word in name.split("_") if word]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


class Spec(BaseModel):
    """A typed config; invalid values raise ConfigError naming the field, rule and value.

    Form titles are written for people (``human_title``), not derived word by word."""

    model_config = ConfigDict(extra="forbid", field_title_generator=human_title)

    def __init__(self, **data: Any) -> None:
        if _validating.get():
            super().__init__(**data)
            return
        token = _validating.set(True)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, type(self).__name__)) from exc
        finally:
            _validating.reset(token)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        if _validating.get():
            return super().model_validate(obj, *args, **kwargs)
        token = _validating.set(True)
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls.__name__)) from exc
        finally:
            _validating.reset(token)
