"""params.yaml validation: every wrong key or value is an error that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_project_params_file_validates() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.data.task == "cue-seg"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"data\.imag_size: unknown key"):
        load_params(write(tmp_path, "data:\n  imag_size: 64\n"))


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"dataa: unknown key"):
        load_params(write(tmp_path, "dataa: {}\n"))


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"data\.image_size: .*16 \(got 4\)"):
        load_params(write(tmp_path, "data:\n  image_size: 4\n"))
    with pytest.raises(ParamsError, match=r"data\.task: .*'cue-seg'"):
        load_params(write(tmp_path, "data:\n  task: cityscapes\n"))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="2 invalid setting") as info:
        load_params(write(tmp_path, "seed: -1\ndata:\n  num_samples: x\n"))
    assert "seed" in str(info.value) and "data.num_samples" in str(info.value)


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="leave room for a train split"):
        load_params(write(tmp_path, "data:\n  val_fraction: 0.5\n  test_fraction: 0.5\n"))
    with pytest.raises(ParamsError, match="set data.root"):
        load_params(write(tmp_path, "data:\n  task: folder-cls\n"))


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path) -> None:
    p = write(tmp_path, "data:\n  num_samples: 100\n")
    params = load_params(p, ["data.num_samples=30", "data.large.image_size=128"])
    assert params.data.num_samples == 30 and params.data.large.image_size == 128
    with pytest.raises(ParamsError, match="data.num_samples"):
        load_params(p, ["data.num_samples=-3"])
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        load_params(p, ["data.num_samples"])


def test_tune_points_must_lie_in_the_search_space(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"points_to_evaluate\[0\]\.module: 'aspp' is not in"):
        load_params(write(tmp_path, "tune:\n  points_to_evaluate: [{module: aspp}]\n"))
    with pytest.raises(ParamsError, match=r"points_to_evaluate\[1\]: unknown key 'depth'"):
        load_params(write(tmp_path, "tune:\n  points_to_evaluate: [{module: none}, {depth: 3}]\n"))
    load_params(write(tmp_path, "tune:\n  points_to_evaluate: [{module: ppm, lr: 0.01}]\n"))
