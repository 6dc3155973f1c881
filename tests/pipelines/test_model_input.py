"""Evaluate, serve and explain feed a model the same input for the same image file.

The model inputs are recorded by a forward pre-hook on the model itself, for images whose
size differs from the model's (test split images 32 px, large ones 80 px, the model 24 px):
a classifier (every path resizes to its size) and a fixed-size segmenter (a ViT: the
evaluate stage's ``resize`` mode and the served model with ``sliding=off``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pipelines.serve.predictor as predictor_module
from gattn.models import build_model, load_model, save_model
from pipelines.commands.explain import explain
from pipelines.config import EvaluateParams, Params
from pipelines.serve.http_io import decode_image
from pipelines.serve.predictor import InputSpec, Job, Options, Predictor
from pipelines.stages.evaluate import open_sets, runners
from pipelines.stages.prepare import prepare

SIZE = 24  # the models' input size; the prepared images are 32 (test) and 80 (large) px
VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}


def prepared_data(root: Path, task: str) -> Path:
    data = {
        "task": task,
        "num_samples": 8,
        "image_size": 32,
        "large": {"num_samples": 1, "image_size": 80},
        "grid_samples": 2,
    }
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "reports")
    return root / "prepared"


def model_folder(root: Path, task: str, prepared: Path) -> Path:
    torch.manual_seed(0)
    classes = json.loads((prepared / "splits.json").read_text())["classes"]
    cfg = {
        "task": task,
        "backbone": "gattn_vit_global",
        "num_classes": len(classes),
        "img_size": SIZE,
        "backbone_kwargs": VIT,
        **({"head": "fcn"} if task == "seg" else {}),
    }
    return save_model(build_model(cfg).eval(), cfg, root / "model", classes=classes, img_size=SIZE)


def recording(model: nn.Module) -> list[torch.Tensor]:
    """Inputs of every forward pass of ``model`` from now on."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def sample_file(dataset, index: int) -> Path:
    """The image file of a data set sample (through a ``Subset``)."""
    while hasattr(dataset, "indices"):
        dataset, index = dataset.dataset, dataset.indices[index]
    return Path(dataset.samples[index][0])


def served_input(folder: Path, path: Path, options: Options) -> torch.Tensor:
    """What the serving app feeds the model for an upload of ``path``: the ingress decodes
    and preprocesses it, a replica runs the job."""
    predictor = Predictor(folder)
    seen = recording(predictor.model)
    x = predictor.spec.preprocess(decode_image(path.read_bytes(), 10**8, predictor.spec.mode))
    (result,) = predictor.run([Job(x.numpy(), options)])
    assert not isinstance(result, Exception), result
    (model_input,) = seen
    return model_input


def evaluated_input(folder: Path, prepared: Path, set_name: str, mode: str) -> tuple:
    """What the evaluate stage feeds the model for the first image of a set in a mode, and
    that image's file."""
    model, cfg = load_model(folder)
    spec = InputSpec.of(model, cfg, str(folder))
    dataset = open_sets(spec, prepared, None)[set_name]
    run = runners(model, spec.task, SIZE, EvaluateParams(), set_name == "large")[mode]
    seen = recording(model)
    with torch.no_grad():
        run(dataset[0][0][None])
    (model_input,) = seen
    return model_input, sample_file(dataset, 0)


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    prepared = prepared_data(root, "pathfinder")
    return prepared, model_folder(root, "cls", prepared)


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seg")
    prepared = prepared_data(root, "cue-seg")
    return prepared, model_folder(root, "seg", prepared)


@pytest.mark.parametrize(("set_name", "mode"), [("test", "plain"), ("large", "resize")])
def test_classifier_is_evaluated_on_what_it_is_served(cls_setup, set_name, mode) -> None:
    prepared, folder = cls_setup
    evaluated, path = evaluated_input(folder, prepared, set_name, mode)
    served = served_input(folder, path, Options())
    assert evaluated.shape == (1, 3, SIZE, SIZE) and served.shape == evaluated.shape
    assert torch.equal(evaluated, served)


def test_explain_sees_the_served_input(cls_setup, tmp_path, monkeypatch) -> None:
    prepared, folder = cls_setup
    evaluated, path = evaluated_input(folder, prepared, "large", "resize")
    recorded: list[list[torch.Tensor]] = []

    def load_and_record(*args, **kwargs):
        model, cfg = load_model(*args, **kwargs)
        recorded.append(recording(model))
        return model, cfg

    monkeypatch.setattr(predictor_module, "load_model", load_and_record)
    explain(path, folder, out=tmp_path / "overlay.png")
    ((*inputs,),) = recorded  # one model loaded; a prediction and the rollout's passes
    assert inputs and all(torch.equal(x, evaluated) for x in inputs)


@pytest.mark.parametrize(("set_name", "mode"), [("test", "plain"), ("large", "resize")])
def test_fixed_size_segmenter_is_evaluated_on_what_it_is_served(seg_setup, set_name, mode):
    prepared, folder = seg_setup
    evaluated, path = evaluated_input(folder, prepared, set_name, mode)
    served = served_input(folder, path, Options(sliding="off"))
    assert evaluated.shape == (1, 3, SIZE, SIZE) and served.shape == evaluated.shape
    assert torch.equal(evaluated, served)
