"""``params.yaml``: one pydantic model per section, so a wrong key or value is a clear error.

Every stage reads its section through :func:`load_params`; errors name the file, the dotted key
and what is expected, e.g. ``params.yaml: data.image_size: Input should be greater than or
equal to 16 (got 4)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class ParamsError(ValueError):
    """``params.yaml`` is missing, not YAML, or does not validate."""


def _format(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see params.yaml's sections)")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params FILE")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to nested ``data`` in place."""
    if "=" not in assignment:
        raise ParamsError(f"override {assignment!r}: expected KEY=VALUE, e.g. data.image_size=64")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {assignment!r}: {p!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def validate(model: type[BaseModel], data: dict[str, Any], path: Path) -> BaseModel:
    """Validate ``data`` against ``model``; raise :class:`ParamsError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format(path, err)) from None
