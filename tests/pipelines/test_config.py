"""params.yaml validation: every wrong key or value is an error that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import GENERATED, TASK_KINDS, ParamsError, load_params

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


POINT = (
    "{family: cnn, module: ppm, module_size: small, attn_impl: fused, position: last, "
    "num_blocks: 1, head: fcn, batch_size: 8, img_size: 64, lr: 0.003}"
)


def test_tune_points_must_lie_in_the_search_space(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"points_to_evaluate\[0\]\.module: 'aspp' is not in"):
        load_params(write(tmp_path, "tune:\n  points_to_evaluate: [{module: aspp}]\n"))
    with pytest.raises(ParamsError, match=r"points_to_evaluate\[1\]: unknown key 'depth'"):
        load_params(write(tmp_path, "tune:\n  points_to_evaluate: [{module: none}, {depth: 3}]\n"))
    load_params(write(tmp_path, f"tune:\n  points_to_evaluate: [{POINT}]\n"))


def test_tune_point_errors_name_the_point_and_the_key(tmp_path: Path) -> None:
    cases = {
        "{lr: 0.5}": r"tune\.points_to_evaluate\[0\]\.lr: 0\.5 is outside the tune\.lr range",
        "{lr: 3e-3}": r"tune\.points_to_evaluate\[0\]\.lr: '3e-3' is not a number",
        "{head: aspp}": r"tune\.points_to_evaluate\[0\]\.head: 'aspp' is not in tune\.heads",
        # Ray's searcher needs every knob fixed: a partial point is refused at load, not in tune.
        "{module: ppm, lr: 0.01}": r"tune\.points_to_evaluate\[0\]: missing key\(s\) \['family'",
    }
    for point, message in cases.items():
        with pytest.raises(ParamsError, match=message):
            load_params(write(tmp_path, f"tune:\n  points_to_evaluate: [{point}]\n"))


@pytest.mark.parametrize("task", list(TASK_KINDS))
def test_every_default_holds_for_every_task(tmp_path: Path, task: str) -> None:
    """The project's params.yaml with only data.task (and data.root) changed validates, and
    its sweep points fit the task's search space exactly (Ray's own warm-start check)."""
    from ray.tune.utils.util import validate_warmstart

    from pipelines.stages.tune.space import search_space

    root = [] if task in GENERATED else ["data.root=photos"]
    if task == "torchvision-cls":
        root.append("data.dataset=FashionMNIST")
    params = load_params(ROOT / "params.yaml", [f"data.task={task}", *root])
    kind = params.data.kind
    space = search_space(params.tune, kind)
    points = params.tune.points(kind)
    assert points and all(set(point) == set(space) for point in points)
    validate_warmstart(list(space), points, [])
    assert ("head" in space) == (kind == "seg")


def test_task_and_data_keys_must_fit(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"data\.root: task 'cue-seg' generates its images"):
        load_params(write(tmp_path, "data:\n  root: photos\n"))
    with pytest.raises(ParamsError, match=r"data\.num_classes: set for folder-seg only"):
        load_params(write(tmp_path, "data:\n  task: folder-cls\n  root: x\n  num_classes: 3\n"))
    params = load_params(write(tmp_path, "data:\n  task: folder-seg\n  root: x\n"))
    assert params.data.num_classes is None  # read from the masks by prepare
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['head'\].*data\.task 'cue-seg'"):
        point = POINT.replace("head: fcn, ", "")
        load_params(write(tmp_path, f"tune:\n  points_to_evaluate: [{point}]\n"))
    point = POINT.replace("head: fcn, ", "")  # classification: no head knob
    text = f"data:\n  task: pathfinder\ntune:\n  points_to_evaluate: [{point}]\n"
    assert load_params(write(tmp_path, text)).tune.points("cls")[0]["module"] == "ppm"


def test_torchvision_task_and_its_keys_must_fit(tmp_path: Path) -> None:
    tv = "data:\n  task: torchvision-cls\n  root: ext\n"
    params = load_params(write(tmp_path, tv + "  dataset: FashionMNIST\n  num_samples: null\n"))
    assert params.data.kind == "cls" and params.data.num_samples is None
    assert params.data.download is False
    cases = {
        # an unknown name: the key and the valid choices
        tv + "  dataset: FashionMnist\n": r"data\.dataset: .*'MNIST', 'FashionMNIST'.*"
        r"\(got 'FashionMnist'\)",
        tv: r"data\.dataset: task 'torchvision-cls' reads the torchvision data set",
        "data:\n  task: torchvision-cls\n  dataset: MNIST\n": r"reads a torchvision data set: "
        r"set data\.root",
        "data:\n  dataset: MNIST\n": r"data\.dataset: set for torchvision-cls only \(task "
        r"'cue-seg'\)",
        "data:\n  task: folder-cls\n  root: x\n  download: true\n": r"data\.download: set for "
        r"torchvision-cls only",
        tv + "  dataset: MNIST\n  generator: {num_cues: 3}\n": r"data\.generator: .*generates "
        r"nothing",
        "data:\n  task: folder-seg\n  root: x\n  generator: {a: 1}\n": r"data\.generator",
        "data:\n  num_samples: null\n": r"data\.num_samples: task 'cue-seg' generates",
        "data:\n  root: x\n": r"folder-cls, folder-seg, folder-det or torchvision-cls",
    }
    for text, message in cases.items():
        with pytest.raises(ParamsError, match=message):
            load_params(write(tmp_path, text))


def test_params_spell_out_the_supported_torchvision_sets() -> None:
    """``data.dataset``'s choices are written out in pipelines/config.py (loading params
    imports no torch): they must be the data sets gattn opens."""
    import typing

    from gattn.data.torchvision_sets import TRAIN_TEST
    from pipelines.config import TorchvisionSet

    assert list(typing.get_args(TorchvisionSet)) == list(TRAIN_TEST)


def test_serve_app_args_are_the_serve_sections_request_settings() -> None:
    """AppArgs declares each of APP_FIELDS with ServeParams's type, default and checks."""
    from pipelines.config import ServeParams
    from pipelines.contracts import APP_FIELDS, AppArgs

    assert tuple(AppArgs.model_fields) == ("model", "tracking_uri", *APP_FIELDS)
    for name in APP_FIELDS:
        ours, theirs = AppArgs.model_fields[name], ServeParams.model_fields[name]
        assert ours.annotation == theirs.annotation, name
        assert ours.default == theirs.default and ours.metadata == theirs.metadata, name


def test_detection_tasks_and_their_keys_must_fit(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "data:\n  task: tiny-det\n  generator: {num_cues: 2}\n"))
    assert params.data.kind == "det" and params.data.generator == {"num_cues": 2}
    params = load_params(write(tmp_path, "data:\n  task: folder-det\n  root: photos\n"))
    assert params.data.kind == "det"
    cases = {
        "data:\n  task: folder-det\n": r"task 'folder-det' reads your images: set data\.root",
        "data:\n  task: tiny-det\n  root: x\n": r"data\.root: task 'tiny-det' generates",
        "data:\n  task: folder-det\n  root: x\n  num_classes: 2\n": r"data\.num_classes: set "
        r"for folder-seg only .*folder-det's COCO categories",
        "data:\n  task: folder-det\n  root: x\n  generator: {num_cues: 2}\n": r"data\.generator",
        "data:\n  task: tiny-det\n  num_samples: null\n": r"data\.num_samples: task 'tiny-det'",
        "data:\n  task: tiny-dets\n": r"data\.task: .*'tiny-det'.*'folder-det'",
    }
    for text, message in cases.items():
        with pytest.raises(ParamsError, match=message):
            load_params(write(tmp_path, text))
