"""``pipelines.paths`` and ``dvc.yaml`` name the same files: every output folder a stage
declares is a path constant (or inside one), and every stage path constant is in dvc.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines import paths

ROOT = Path(__file__).resolve().parents[2]
NOT_DVC = {"EXPLAIN_REPORTS"}  # `gattn explain` is a command, not a stage


def _declared() -> set[Path]:
    """Every path a dvc.yaml stage lists as deps, outs, metrics or plots."""
    found: set[Path] = set()
    for spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for key in ("deps", "outs", "metrics", "plots"):
            for item in spec.get(key, []):
                found.update(Path(k) for k in (item if isinstance(item, dict) else [item]))
    return found


def _constants() -> dict[str, Path]:
    return {k: v for k, v in vars(paths).items() if isinstance(v, Path) and k.isupper()}


def test_every_stage_path_constant_is_in_dvc_yaml() -> None:
    declared = _declared()
    for name, path in _constants().items():
        if name in NOT_DVC:
            continue
        assert any(path == d or path in d.parents or d in path.parents for d in declared), (
            f"pipelines.paths.{name} = {path} is not in dvc.yaml"
        )


def test_every_stage_output_is_under_a_path_constant() -> None:
    constants = set(_constants().values())
    for out in _declared():
        if out.parts[0] in ("data", "models", "reports"):
            assert any(out == c or c in out.parents for c in constants), (
                f"dvc.yaml names {out}, which no pipelines.paths constant holds"
            )
