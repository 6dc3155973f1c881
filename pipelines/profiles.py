"""Params profiles (``params-<name>.yaml``) as DVC experiments.

A profile is a whole params file, like ``params.yaml``: keys it does not set take their
defaults (:mod:`pipelines.config`), not ``params.yaml``'s values. DVC's stages read
``params.yaml`` only, so ``gattn pipeline --params params-<name>.yaml`` runs the profile as a
named DVC experiment, ``dvc exp run --name <name> -S KEY=VALUE ...``, with the ``-S`` overrides
that make ``params.yaml`` hold the profile's effective values (:func:`profile_overrides`): the
run then shows next to the default in ``dvc exp show``, and ``params.yaml`` records what ran.

The overrides compare the two files *after* validation (every key, with the defaults filled
in), so a key that ``params.yaml`` sets and the profile leaves out becomes its default, and
they are written in the `Hydra override grammar
<https://hydra.cc/docs/advanced/override_grammar/basic/>`_ that DVC 3's ``-S`` takes:
``key=value`` changes a key, ``+key=value`` adds one, ``~key`` removes one (an entry of a free
mapping such as ``tune.families``); a list is replaced whole.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.config import ParamsError, load_params

# An unquoted Hydra dict key (ID in its grammar; also what a dotted -S key may hold).
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_QUOTE_ESCAPES = re.compile(r'(\\*)("|\Z)')  # backslashes before a quote or the end


def hydra_value(value: Any) -> str:
    """``value`` (JSON-like: None, bool, int, float, str, list, dict) as a Hydra override value.

    Strings are always quoted (double quotes, which read well inside a shell's single
    quotes), so ``"64"`` stays text and ``"null"`` is not None; floats keep
    Python's shortest exact form (``1e-05``), which Hydra reads as a float.

    Raises:
        ValueError: a value or dict key Hydra cannot take back unchanged.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r}: not a finite number")
        return repr(value)
    if isinstance(value, str):
        if "${" in value:
            raise ValueError(f"{value!r}: Hydra would read ${{...}} as an interpolation")
        # Hydra unescapes only backslashes before a quote or at the end of a quoted string.
        escaped = _QUOTE_ESCAPES.sub(
            lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), value
        )
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str) or not _KEY.match(key):
                raise ValueError(f"{key!r}: not a key that Hydra reads unquoted")
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{value!r}: a {type(value).__name__} has no Hydra form")


def param_overrides(
    base: Mapping[str, Any], target: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """The Hydra overrides (DVC's ``-S``) that turn the mapping ``base`` into ``target``.

    Mappings are compared key by key, anything else whole. Removing a key whose value is None
    is beyond Hydra (``~key`` on a null fails: "does not exist"), so a mapping that loses one
    is replaced whole (``~key`` then ``+key={...}``); at the top level that is an error.

    Args:
        base: What the file holds now (e.g. ``params.yaml``, validated and dumped).
        target: What it should hold.
        prefix: The dotted path of ``base`` in the file (``""``: the top level).

    Raises:
        ValueError: a key or value that cannot be written as an override.
    """
    out: list[str] = []
    for key, new in target.items():
        if not _KEY.match(str(key)):
            raise ValueError(f"{prefix}{key}: not a key that an override can name")
        path = f"{prefix}{key}"
        if key not in base:
            out.append(f"+{path}={hydra_value(new)}")
            continue
        old = base[key]
        if old == new and type(old) is type(new):
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            lost = [k for k in old if k not in new]
            if any(old[k] is None for k in lost):  # Hydra cannot delete a null: replace
                out += [f"~{path}", f"+{path}={hydra_value(new)}"]
            else:
                out += param_overrides(old, new, f"{path}.")
        elif isinstance(old, Mapping):  # a mapping becomes something else
            out += [f"~{path}", f"+{path}={hydra_value(new)}"]
        else:
            out.append(f"{path}={hydra_value(new)}")
    for key, old in base.items():
        if key not in target:
            if old is None:
                raise ValueError(
                    f"{prefix}{key}: a null key cannot be removed by an override; "
                    "remove it from the file by hand"
                )
            out.append(f"~{prefix}{key}")
    return out


def effective(path: str | Path) -> dict[str, Any]:
    """The params file at ``path`` as the stages see it: validated, every default filled in,
    as plain JSON types (tuples as lists)."""
    return json.loads(load_params(path).model_dump_json())


def profile_overrides(profile: str | Path, base: str | Path = "params.yaml") -> list[str]:
    """The ``dvc exp run -S`` overrides that make ``base`` run as ``profile``: after them,
    ``load_params(base) == load_params(profile)``. Both files must validate.

    Raises:
        ParamsError: a file does not validate, or holds what an override cannot write.
    """
    try:
        return param_overrides(effective(base), effective(profile))
    except ValueError as err:
        if isinstance(err, ParamsError):
            raise
        raise ParamsError(f"{profile}: {err}") from None


def apply_with_dvc(path: str | Path, overrides: list[str]) -> None:
    """Apply ``overrides`` to the params file at ``path`` in place, with the code ``dvc exp
    run -S`` runs (:func:`dvc.utils.hydra.apply_overrides`: Hydra's parser, DVC's YAML
    round trip, which keeps comments)."""
    from dvc.utils.hydra import apply_overrides  # type: ignore[import-untyped]

    apply_overrides(str(path), overrides)


def check_overrides(profile: str | Path, base: str | Path, overrides: list[str]) -> None:
    """Apply ``overrides`` to a copy of ``base`` as DVC will, and check that the result loads
    as ``profile`` does, before any stage runs.

    Raises:
        ParamsError: they differ, e.g. a small float in a free-form value (DVC writes
            ``1e-05``, which a YAML 1.1 reader takes for text), naming the keys.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(base, copy)
        try:
            apply_with_dvc(copy, overrides)
            got = effective(copy)
        except Exception as err:  # Hydra's or DVC's refusal, or a file that no longer loads
            raise ParamsError(f"{profile}: dvc exp run -S would fail: {err}") from None
    differ = param_overrides(got, effective(profile))
    if differ:
        raise ParamsError(
            f"{profile}: after dvc exp run -S, {base} would still differ from the profile "
            f"({', '.join(differ)}): DVC writes them so that they read back otherwise (a float "
            "below 1e-4 in a free-form value comes back as text); set them in params.yaml "
            "by hand"
        )


def experiment_name(profile: str | Path) -> str:
    """The DVC experiment name of a profile: its file stem less ``params-``
    (``params-fashion-mnist.yaml`` -> ``fashion-mnist``)."""
    stem = Path(profile).stem
    return stem.removeprefix("params-") or stem
